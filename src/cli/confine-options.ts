import * as path from "node:path";
import type { Command } from "commander";
import type { Confinement } from "../chain/access-policy";
import { NO_URL_RULES, type UrlRules, parseOrigins, withOrigins } from "../chain/url-policy";

/**
 * --confine, --allow-dir, --allow-url, --url-auth: shared by every addcow
 * command that opens a disk (docs/security.md).
 */

export interface ConfineFlags {
  confine?: boolean;
  allowDir?: string[];
  /** Lists of origins; "*" for the bare option (any origin, and confinement, as before). */
  allowUrl?: string[];
  urlAuth?: string[];
}

function collect(value: string, previous: string[] | undefined): string[] {
  return [...(previous ?? []), value];
}

/** What the bare --allow-url stands for once argv is spelled out (see spellBareAllowUrl). */
const ANY = "*";

export function addConfineOptions(cmd: Command): Command {
  return cmd
    .option(
      "--confine",
      "names in headers must resolve inside the disk's directory (or an --allow-dir); use for any disk you did not make",
    )
    .option(
      "--allow-dir <dir>",
      "with --confine (implied): a trusted directory names may also reach, e.g. shared base images; repeatable",
      collect,
    )
    .option(
      "--allow-url [origins]",
      "origins (https://images.example.com,s3://golden) the URL backing names of another user's disk, or of a confined one, may use; repeatable. Alone: any origin, and --confine",
      collect,
    )
    .option(
      "--url-auth <origins>",
      "origins whose requests for another user's (or a confined) disk carry your credentials (ADDCOW_HTTP_TOKEN, the auth file, AWS keys); allows them too; repeatable",
      collect,
    );
}

/**
 * The old spelling `--allow-url` takes no value; the new one takes a list.
 * A bare `--allow-url` (last, or followed by something that is no URL) is
 * spelled `--allow-url=*` before the arguments are parsed, so it never eats
 * the disk's name.
 */
export function spellBareAllowUrl(args: string[]): string[] {
  return args.map((a, i) => {
    if (a !== "--allow-url") return a;
    const next = args[i + 1];
    return next === undefined || next.startsWith("-") || !next.includes("://")
      ? `--allow-url=${ANY}`
      : a;
  });
}

/** The confinement and URL rules the flags ask for. */
export function trustFromFlags(flags: ConfineFlags): {
  confine: Confinement | null;
  urls: UrlRules;
} {
  let urls: UrlRules = NO_URL_RULES;
  for (const list of flags.allowUrl ?? []) {
    if (list === ANY) urls = { ...urls, any: true };
    else urls = withOrigins(urls, parseOrigins(list, "--allow-url"));
  }
  for (const list of flags.urlAuth ?? []) {
    urls = withOrigins(urls, parseOrigins(list, "--url-auth"), true);
  }
  const allowDirs = (flags.allowDir ?? []).map((d) => path.resolve(d));
  // The bare --allow-url implied confinement, and still does; lists do not.
  const confined = flags.confine === true || allowDirs.length > 0 || urls.any;
  const allowUrls = urls.any || urls.origins.length > 0;
  return { confine: confined ? { allowDirs, allowUrls } : null, urls };
}
