import type { Command } from "commander";
import { allDaemons } from "../../control/client";
import type { JobStatus } from "../../jobs/job";
import { formatSize } from "../../util/size";
import { action } from "../run-cli";
import { addJsonOption } from "../qemu-options";

export function register(program: Command): void {
  addJsonOption(
    program.command("jobs").description("list the block jobs running in addcow-mount daemons"),
    "print a JSON array",
  ).action(
    action(async (flags: { json?: boolean }) => {
      const jobs: Array<JobStatus & { pid: number }> = [];
      for (const { client, hello } of await allDaemons()) {
        const res = await client.call<{ ok: true; jobs: JobStatus[] }>({ op: "list" });
        for (const j of res.jobs) jobs.push({ ...j, pid: hello.pid });
      }
      if (flags.json) {
        process.stdout.write(JSON.stringify(jobs) + "\n");
        return;
      }
      if (jobs.length === 0) {
        process.stdout.write("no jobs\n");
        return;
      }
      for (const j of jobs) {
        const pct = j.total > 0 ? Math.floor((j.done / j.total) * 100) : 100;
        process.stdout.write(
          `${j.id}  ${j.kind}  ${j.state}  ${pct}%  ${formatSize(j.done)}/${formatSize(j.total)}  ${formatSize(Math.round(j.rate))}/s  ${j.disk}  (daemon ${j.pid})${j.error ? `  error: ${j.error}` : ""}\n`,
        );
      }
    }),
  );
}
