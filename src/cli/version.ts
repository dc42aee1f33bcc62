// The version both commands print (--version): package.json's, read where the package is installed.
import { readFileSync } from 'node:fs';

/** package.json's "version"; this file is src/cli/version.ts or dist/cli/version.js, two levels below it. */
export const VERSION: string = (JSON.parse(readFileSync(new URL('../../package.json', import.meta.url), 'utf8')) as { version: string }).version;
