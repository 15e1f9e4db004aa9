import type { Command } from "commander";
import { allDaemons } from "../../control/client";
import type { JobStatus } from "../../jobs/job";
import { AddCowError } from "../../util/errors";
import { action } from "../run-cli";

const ACTIONS = ["pause", "resume", "cancel"] as const;
type JobAction = (typeof ACTIONS)[number];

export function register(program: Command): void {
  program
    .command("job")
    .description("pause, resume or cancel a block job running in an addcow-mount daemon")
    .argument("<action>", "pause, resume or cancel")
    .argument("<id>", "the job id, as 'addcow jobs' shows it")
    .action(
      action(async (what: string, id: string) => {
        if (!ACTIONS.includes(what as JobAction)) {
          throw new AddCowError(
            `unknown job action ${JSON.stringify(what)}: use pause, resume or cancel`,
          );
        }
        for (const { client } of await allDaemons()) {
          const res = await client.call<{ ok: true; jobs: JobStatus[] }>({ op: "list" });
          if (!res.jobs.some((j) => j.id === id)) continue;
          const answer = await client.call<{ ok: true; job: JobStatus }>({
            op: what as JobAction,
            id,
          });
          // A cancelled job stops its copies and flushes first: report how it ended.
          const job = what === "cancel" ? await client.watch(id, () => undefined) : answer.job;
          const why = job.error ?? job.message;
          process.stdout.write(`job ${id}: ${job.state}${why ? ` (${why})` : ""}\n`);
          return job.state === "failed" ? 1 : 0;
        }
        throw new AddCowError(`no running job ${id}: 'addcow jobs' lists the running ones`);
      }),
    );
}
