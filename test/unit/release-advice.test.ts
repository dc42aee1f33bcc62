// The detach refusal's advice fits how many users it names (newuser11 finding 10: two mounted
// partitions were told "unmount it first").
import { describe, expect, it } from 'vitest';
import { releaseAdvice } from '../../src/bdev/partitions.js';

describe('releaseAdvice', () => {
  it('says "it" for one user and "them" for several, by the first one\'s kind', () => {
    expect(releaseAdvice(['/dev/loop7p1 is mounted on /m1a'])).toBe('unmount it first');
    expect(releaseAdvice(['/dev/loop7p1 is mounted on /m1a', '/dev/loop7p2 is mounted on /m1b'])).toBe('unmount them first');
    expect(releaseAdvice(['/dev/loop7 is held by dm-0'])).toBe('remove what is stacked on it first');
    expect(releaseAdvice(['/dev/loop7p2 is open by pid 9 (node)', '/dev/loop7p1 is open by pid 10 (dd)'])).toBe('stop or close them first');
  });
});
