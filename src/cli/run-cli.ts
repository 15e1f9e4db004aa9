import * as fs from "node:fs";
import * as path from "node:path";
import { Command, CommanderError } from "commander";
import { AddCowError, describeError, errnoCode } from "../util/errors";
import { log } from "../util/log";

/**
 * Shared by every addcow executable: turns any failure into one line on stderr
 * ("<program>: <message>") and an exit code, never a stack trace unless
 * DEBUG=addcow:* is set. Exit codes: 0 success, 1 error or usage error, and
 * whatever a command asks for (2 = check found corruption).
 */

/** What an action may return: an exit code (0 or nothing = success). */
export type ActionResult = number | void;

/**
 * Wraps a command action so its return value becomes the exit code. Use it for
 * every `.action(...)`: errors thrown inside are reported by runCli.
 */
export function action<A extends unknown[]>(
  fn: (...args: A) => Promise<ActionResult> | ActionResult,
): (...args: A) => Promise<void> {
  return async (...args: A) => {
    const code = await fn(...args);
    if (typeof code === "number" && code !== 0) process.exitCode = code;
  };
}

/** Thrown to stop with a given exit code after the command has printed what it needs. */
export class CliExit extends Error {
  constructor(readonly exitCode: number) {
    super(`exit ${exitCode}`);
    this.name = "CliExit";
  }
}

/** The package version, from the package.json above the compiled file. */
export function packageVersion(): string {
  let dir = __dirname;
  for (let i = 0; i < 6; i++) {
    const candidate = path.join(dir, "package.json");
    try {
      const pkg = JSON.parse(fs.readFileSync(candidate, "utf8")) as {
        name?: string;
        version?: string;
      };
      if (pkg.name === "addcow" && pkg.version) return pkg.version;
    } catch {
      // Not here; look one directory up.
    }
    dir = path.dirname(dir);
  }
  return "unknown";
}

/** Applies the shared error handling to a command and all its subcommands. */
function configure(cmd: Command): void {
  cmd.exitOverride();
  // Commander's own messages ("error: ...") are printed by runCli as one line instead.
  cmd.configureOutput({ outputError: () => undefined });
  cmd.showSuggestionAfterError(true);
  for (const sub of cmd.commands) configure(sub);
}

/** The one line a user sees for an error (no "error: " prefix, no line breaks). */
export function errorLine(err: unknown): string {
  if (err instanceof CommanderError) {
    const text = err.message.replace(/^error: /, "").replace(/\s*\n\s*/g, " ");
    return text;
  }
  if (err instanceof AddCowError) return oneLine(err.message);
  const code = errnoCode(err);
  if (err instanceof Error && code !== undefined) return oneLine(describeError(err));
  const text = err instanceof Error ? err.message : String(err);
  return `internal error: ${oneLine(text)} (run with DEBUG=addcow:* for a stack trace)`;
}

function oneLine(text: string): string {
  return text.replace(/\s*\n\s*/g, " ").trim();
}

/** Exit quietly when stdout is closed early (e.g. `addcow map disk | head`). */
function ignoreClosedStdout(): void {
  process.stdout.on("error", (err) => {
    if (errnoCode(err) === "EPIPE") process.exit(process.exitCode ?? 0);
    throw err;
  });
}

/** With DEBUG=addcow:cli, which program, version and Node.js run (a daemon child too). */
export function logStart(program: string): void {
  if (!log.cli.enabled) return;
  log.cli("%s %s on Node.js %s (%s)", program, packageVersion(), process.version, process.execPath);
}

/**
 * Parses argv and runs the chosen command. Resolves when the action finishes;
 * sets process.exitCode instead of calling process.exit, so output is flushed.
 * Returns the exit code.
 */
export async function runCli(program: Command, argv: string[] = process.argv): Promise<number> {
  configure(program);
  ignoreClosedStdout();
  const name = program.name();
  logStart(name);
  try {
    await program.parseAsync(argv);
    return Number(process.exitCode ?? 0);
  } catch (err) {
    let code = 1;
    if (err instanceof CliExit) {
      code = err.exitCode;
    } else if (
      err instanceof CommanderError &&
      ["commander.helpDisplayed", "commander.version", "commander.help"].includes(err.code)
    ) {
      // Help or version text was printed already.
      code = err.exitCode;
    } else {
      if (err instanceof CommanderError) {
        const hint = err.code === "commander.unknownCommand" ? "" : usageHint(program, argv);
        process.stderr.write(`${name}: ${errorLine(err)}${hint}\n`);
      } else {
        process.stderr.write(`${name}: ${errorLine(err)}\n`);
      }
      if (log.cli.enabled && err instanceof Error && err.stack) {
        process.stderr.write(`${err.stack}\n`);
      }
      code = err instanceof CommanderError ? err.exitCode || 1 : 1;
    }
    process.exitCode = code;
    return code;
  }
}

/** " (see 'addcow create --help')" for the subcommand the user was running. */
function usageHint(program: Command, argv: string[]): string {
  const first = argv.slice(2).find((a) => !a.startsWith("-"));
  const sub = program.commands.find((c) => c.name() === first || c.aliases().includes(first ?? ""));
  const what = sub ? `${program.name()} ${sub.name()}` : program.name();
  return ` (see '${what} --help')`;
}
