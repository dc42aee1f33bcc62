// The man pages come from the commands' own definitions: every visible option and argument of
// every command is in ulobdev(8) and ulohttp(8) with the text --help prints, hidden test options
// are not, the exit status table is exit-codes.ts, and groff reads the pages without a warning.
import { execFileSync, spawnSync } from 'node:child_process';
import { mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { Command } from 'commander';
import { describe, expect, it } from 'vitest';
import { EXIT_CODES } from '../../src/cli/exit-codes.js';
import { ulobdevManPage, ulohttpManPage } from '../../src/cli/man-pages.js';
import { renderManPage, roffText } from '../../src/cli/manpage.js';
import { buildProgram as ulobdevProgram } from '../../src/cli/ulobdev.js';
import { buildProgram as ulohttpProgram } from '../../src/cli/ulohttp.js';

const meta = { date: '2026-01-02', version: '9.8.7' };

/** The page as text: roff through groff (plain ASCII, no hyphenation, no justification). */
function render(page: string): { text: string; warnings: string } {
  const r = spawnSync('groff', ['-man', '-ww', '-Tascii', '-P-cbou', '-rHY=0', '-dAD=l'], { input: page, encoding: 'utf8' });
  expect(r.status, r.stderr).toBe(0);
  // One line per paragraph is easier to search: join groff's line breaks.
  return { text: r.stdout.replace(/-\n\s+/g, '-').replace(/\s+/g, ' '), warnings: r.stderr };
}

function everyOption(program: Command): Array<{ cmd: string; flags: string; description: string; hidden: boolean }> {
  const out = [];
  for (const cmd of [program, ...program.commands]) {
    for (const o of cmd.options) out.push({ cmd: cmd.name(), flags: o.long ?? o.short!, description: o.description, hidden: o.hidden });
  }
  return out;
}

describe.each([
  ['ulobdev', ulobdevProgram, ulobdevManPage],
  ['ulohttp', ulohttpProgram, ulohttpManPage],
] as const)('%s(8)', (name, program, page) => {
  const roff = page(meta);
  const { text, warnings } = render(roff);

  it('renders without a groff warning, with its name, section, version and date', () => {
    expect(warnings).toBe('');
    expect(roff).toMatch(new RegExp(`^\\.TH ${name.toUpperCase()} 8 "2026-01-02" "${name} 9\\.8\\.7"`, 'm'));
    expect(text).toContain(`${name} - ${program().description()}`);
  });

  it('has every visible option with its own help text, and no hidden one', () => {
    const options = everyOption(program());
    expect(options.filter((o) => !o.hidden).length).toBeGreaterThan(name === 'ulobdev' ? 25 : 12);
    for (const o of options) {
      if (o.hidden) {
        expect(text, `${o.cmd} ${o.flags} is hidden`).not.toContain(o.flags);
        continue;
      }
      expect(text, `${o.cmd} ${o.flags}`).toContain(o.flags);
      expect(text, `${o.cmd} ${o.flags}: ${o.description}`).toContain(o.description.replace(/\s+/g, ' '));
    }
  });

  it('names every command and argument in SYNOPSIS and COMMANDS', () => {
    for (const cmd of program().commands) {
      if (cmd.name() === 'help') continue;
      expect(text).toMatch(new RegExp(`SYNOPSIS.*${name} \\[?${cmd.name()}\\b`));
      for (const arg of cmd.registeredArguments) expect(text).toContain(arg.name());
    }
  });

  it('has the exit status table of exit-codes.ts', () => {
    const status = text.slice(text.indexOf('EXIT STATUS'));
    for (const e of EXIT_CODES) expect(status).toContain(`${e.code} (${e.name}) ${e.meaning}`);
  });
});

describe('renderManPage', () => {
  it('follows the definitions: a new option shows up, with its default', () => {
    const program = new Command('tool').description('does a thing');
    program.command('go', { isDefault: true }).description('go now').argument('<WHERE>', 'the place').option('--speed <N>', 'how fast', '3');
    const before = render(renderManPage(program, { ...meta, section: 8, exitCodes: EXIT_CODES })).text;
    expect(before).toContain('--speed N how fast (default: "3")');
    expect(before).toContain('tool [go] [--speed N] WHERE');
    expect(before).not.toContain('--slower');
    program.commands[0]!.option('--slower', 'take it easy');
    expect(render(renderManPage(program, { ...meta, section: 8, exitCodes: EXIT_CODES })).text).toContain('--slower take it easy');
  });

  it('escapes what roff would take as requests or escapes', () => {
    expect(roffText(".starts with a dot and has a \\ and -- dashes")).toBe('\\&.starts with a dot and has a \\e and \\-\\- dashes');
    expect(roffText("'quote")).toBe("\\&'quote");
    const page = renderManPage(new Command('t').description('.x\\y'), { ...meta, section: 8, exitCodes: EXIT_CODES });
    expect(render(page).text).toContain('t - .x\\y');
  });

  it('is what make man writes (scripts/man.mjs, from dist/)', () => {
    const dir = mkdtempSync(join(tmpdir(), 'ulob-man-'));
    try {
      execFileSync('node', ['scripts/man.mjs', dir, meta.date], { stdio: 'pipe' });
      const { version } = JSON.parse(readFileSync('package.json', 'utf8'));
      expect(readFileSync(join(dir, 'ulobdev.8'), 'utf8')).toBe(ulobdevManPage({ date: meta.date, version }));
      expect(readFileSync(join(dir, 'ulohttp.8'), 'utf8')).toBe(ulohttpManPage({ date: meta.date, version }));
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  });
});
