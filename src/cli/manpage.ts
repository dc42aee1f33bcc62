// Man pages from the commands' own commander definitions, so they cannot drift from --help: the
// synopsis, every visible option and argument with its description and default (commander's Help,
// the same text --help prints), and the exit status table (exit-codes.ts). Only the prose that
// has no place in the definitions (FILES, SEE ALSO, notes) is passed in. The output is man(7)
// roff, checked with `groff -man -ww` by test/unit/manpage.test.ts.
import type { Argument, Command, Help, Option } from 'commander';
import type { ExitCode } from './exit-codes.js';

export interface ManSection {
  /** Upper-case section title, e.g. FILES. */
  title: string;
  /** Paragraphs; a paragraph that starts with `$ ` is an example command, shown verbatim. */
  paragraphs?: string[];
  /** Tagged paragraphs: [term, text]. */
  items?: Array<[string, string]>;
}

export interface ManPageInfo {
  /** Manual section: 8 (system administration). */
  section: number;
  /** YYYY-MM-DD, for the footer (the build passes the last commit's date: reproducible). */
  date: string;
  version: string;
  /** Paragraphs after the program's own description. */
  description?: string[];
  exitCodes: readonly ExitCode[];
  /** Sections after EXIT STATUS, in order (ENVIRONMENT, FILES, EXAMPLES, SEE ALSO, ...). */
  sections?: ManSection[];
}

/** Escapes text for roff: backslashes, dashes (so options copy as ASCII), and a leading . or '. */
export function roffText(text: string): string {
  const out = text.replace(/\\/g, '\\e').replace(/-/g, '\\-');
  return /^[.']/.test(out) ? `\\&${out}` : out;
}

/** `-c, --cache <PATH>` as `\fB\-c\fR, \fB\-\-cache\fR \fIPATH\fR`: flags bold, values italic. */
function optionTerm(option: Option): string {
  const [, names = '', value] = /^(.*?)\s*([<[].*[>\]])?$/.exec(option.flags)!;
  const flags = names
    .split(/[ ,|]+/)
    .filter(Boolean)
    .map((flag) => `\\fB${roffText(flag)}\\fR`)
    .join(', ');
  return value ? `${flags} ${optionValue(value)}` : flags;
}

/** `<PATH>` as `\fIPATH\fR`, `[RATE]` as `[\fIRATE\fR]`. */
function optionValue(value: string): string {
  const inner = `\\fI${roffText(value.slice(1, -1))}\\fR`;
  return value.startsWith('[') ? `[${inner}]` : inner;
}

function argumentName(arg: Argument): string {
  return `${arg.name()}${arg.variadic ? '...' : ''}`;
}

/** One synopsis line: the command, each visible option in brackets, then the arguments. */
function synopsis(program: Command, cmd: Command, helper: Help, isDefault: boolean): string {
  const words = [`\\fB${roffText(program.name())}\\fR`];
  if (cmd !== program) words.push(isDefault ? `[\\fB${roffText(cmd.name())}\\fR]` : `\\fB${roffText(cmd.name())}\\fR`);
  for (const option of helper.visibleOptions(cmd)) {
    if (option.long === '--help') continue;
    const value = /[<[].*[>\]]$/.exec(option.flags)?.[0];
    words.push(`[\\fB${roffText(option.short ?? option.long!)}\\fR${value ? ` ${optionValue(value)}` : ''}]`);
  }
  // Every argument: commander's Help lists arguments only when one of them has a description.
  for (const arg of cmd.registeredArguments) {
    const name = `\\fI${roffText(argumentName(arg))}\\fR`;
    words.push(arg.required ? name : `[${name}]`);
  }
  return words.join(' ');
}

function paragraph(text: string): string[] {
  if (text.startsWith('$ ')) return ['.PP', '.RS 4', '.nf', roffText(text.slice(2)), '.fi', '.RE'];
  return ['.PP', roffText(text)];
}

/** The default subcommand (commander's `isDefault`), if any. */
function defaultCommand(program: Command): string | undefined {
  return (program as unknown as { _defaultCommandName?: string })._defaultCommandName;
}

/**
 * A man(7) page for `program` and its subcommands. Commands, arguments and options come from
 * commander's Help (visible ones only; hidden test options stay out), so the page says exactly
 * what the parser accepts.
 */
export function renderManPage(program: Command, info: ManPageInfo): string {
  const helper = program.createHelp();
  const name = program.name();
  const commands = helper.visibleCommands(program).filter((c) => c.name() !== 'help');
  const dflt = defaultCommand(program);
  const out: string[] = [
    `.\\" Generated from the commander definitions of ${name} by src/cli/manpage.ts; do not edit.`,
    `.TH ${name.toUpperCase()} ${info.section} "${info.date}" "${roffText(`${name} ${info.version}`)}" "System Administration"`,
    '.SH NAME',
    `${roffText(name)} \\- ${roffText(program.description())}`,
    '.SH SYNOPSIS',
  ];
  for (const cmd of commands.length > 0 ? commands : [program]) {
    out.push('.PP', '.ad l', synopsis(program, cmd, helper, cmd.name() === dflt), '.ad b');
  }
  out.push('.SH DESCRIPTION');
  for (const p of info.description ?? []) out.push(...paragraph(p));
  out.push(...paragraph(`${name} --help and ${name} COMMAND --help print the same text as this page's COMMANDS.`));

  out.push(commands.length > 0 ? '.SH COMMANDS' : '.SH OPTIONS');
  for (const cmd of commands.length > 0 ? commands : [program]) {
    if (cmd !== program) {
      out.push(`.SS ${roffText(cmd.name())}${cmd.name() === dflt ? ' (the default command)' : ''}`);
      out.push(...paragraph(helper.commandDescription(cmd)));
    }
    for (const arg of cmd.registeredArguments) {
      out.push('.TP', `\\fI${roffText(argumentName(arg))}\\fR`, roffText(helper.argumentDescription(arg) || 'passed on as they are'));
    }
    for (const option of helper.visibleOptions(cmd)) {
      out.push('.TP', optionTerm(option), roffText(helper.optionDescription(option)));
    }
  }

  out.push('.SH EXIT STATUS');
  for (const e of info.exitCodes) out.push('.TP', `\\fB${e.code}\\fR (${roffText(e.name)})`, roffText(e.meaning));

  for (const section of info.sections ?? []) {
    out.push(`.SH ${section.title}`);
    for (const p of section.paragraphs ?? []) out.push(...paragraph(p));
    for (const [term, text] of section.items ?? []) out.push('.TP', `\\fB${roffText(term)}\\fR`, roffText(text));
  }
  return out.join('\n') + '\n';
}
