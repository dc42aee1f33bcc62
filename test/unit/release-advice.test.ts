// The detach refusal's advice fits how many users it names (newuser11 finding 10: two mounted
// partitions were told "unmount it first"), and is picked by each use's kind, never by its text
// (nits14 finding 4: a process named "mounted on" got "unmount it first").
import { describe, expect, it } from 'vitest';
import { releaseAdvice } from '../../src/bdev/partitions.js';
import type { BlockDeviceUser } from '../../src/sys.js';

const mounted = (text: string): BlockDeviceUser => ({ kind: 'mounted', text });
const held = (text: string): BlockDeviceUser => ({ kind: 'held', text });
const open = (text: string): BlockDeviceUser => ({ kind: 'open', text });

describe('releaseAdvice', () => {
  it('says "it" for one user and "them" for several, by the first one\'s kind', () => {
    expect(releaseAdvice([mounted('/dev/loop7p1 is mounted on /m1a')])).toBe('unmount it first');
    expect(releaseAdvice([mounted('/dev/loop7p1 is mounted on /m1a'), mounted('/dev/loop7p2 is mounted on /m1b')])).toBe('unmount them first');
    expect(releaseAdvice([held('/dev/loop7 is held by dm-0')])).toBe('remove what is stacked on it first');
    expect(releaseAdvice([open('/dev/loop7p2 is open by pid 9 (node)'), open('/dev/loop7p1 is open by pid 10 (dd)')])).toBe('stop or close them first');
  });

  it('goes by the kind, whatever the words of the phrase (a command or a mount point may say anything)', () => {
    expect(releaseAdvice([open('/dev/loop7 is open by pid 9 (mounted on)')])).toBe('stop or close it first');
    expect(releaseAdvice([mounted('/dev/loop7 is mounted on /srv/held by/x')])).toBe('unmount it first');
    expect(releaseAdvice([open('/dev/loop7 is open by pid 9 (held by)')])).toBe('stop or close it first');
  });
});
