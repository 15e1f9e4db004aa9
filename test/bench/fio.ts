import { run } from "./util";

/** One fio workload of the list; always psync, on a 1 GiB mounted file. */
export interface Workload {
  name: string;
  description: string;
  rw: "read" | "write" | "randread" | "randwrite";
  bs: string;
  numjobs: number;
  /** fio --fdatasync=1: a flush after every write. */
  fdatasync?: boolean;
  /** Fill the whole overlay first (untimed) so reads come from the image file. */
  prefill?: boolean;
  /** The workload writes (needs a fresh disk for systems without an overlay). */
  writes: boolean;
}

export const workloads: Workload[] = [
  {
    name: "seqread",
    description: "sequential read 1 MiB, direct",
    rw: "read",
    bs: "1M",
    numjobs: 1,
    writes: false,
  },
  {
    name: "seqwrite",
    description: "sequential write 1 MiB, direct",
    rw: "write",
    bs: "1M",
    numjobs: 1,
    writes: true,
  },
  {
    name: "randread",
    description: "random read 4 KiB, direct, 1 job",
    rw: "randread",
    bs: "4k",
    numjobs: 1,
    writes: false,
  },
  {
    name: "randread4",
    description: "random read 4 KiB, direct, 4 jobs",
    rw: "randread",
    bs: "4k",
    numjobs: 4,
    writes: false,
  },
  {
    name: "randwrite-cow",
    description: "random write 4 KiB, direct, fresh overlay (first writes copy on write)",
    rw: "randwrite",
    bs: "4k",
    numjobs: 1,
    writes: true,
  },
  {
    name: "randwrite-sync",
    description: "random write 4 KiB, direct, --fdatasync=1",
    rw: "randwrite",
    bs: "4k",
    numjobs: 1,
    fdatasync: true,
    writes: true,
  },
  {
    name: "randread-full",
    description: "random read 4 KiB, direct, overlay fully written first",
    rw: "randread",
    bs: "4k",
    numjobs: 1,
    prefill: true,
    writes: true,
  },
];

export interface FioResult {
  /** Bytes per second, read + write. */
  bw: number;
  iops: number;
  /** Mean completion latency in microseconds. */
  latUs: number;
  /** Requests completed (read + write). */
  ios: number;
  /** Daemon CPU time per request in microseconds (user + system, all threads), when known. */
  cpuUsPerIo?: number;
}

interface FioSide {
  bw_bytes: number;
  iops: number;
  clat_ns?: { mean: number };
  io_bytes: number;
  total_ios: number;
}

function fioArgs(file: string, size: number): string[] {
  return [
    `--filename=${file}`,
    "--ioengine=psync",
    "--direct=1",
    `--size=${size}`,
    "--group_reporting",
    "--output-format=json",
    "--randrepeat=0",
    "--norandommap",
  ];
}

/** Runs one timed fio job on `file`. */
export async function runFio(
  file: string,
  size: number,
  w: Workload,
  seconds: number,
  extra: string[] = [],
): Promise<FioResult> {
  const args = [
    "--name=bench",
    ...fioArgs(file, size),
    `--rw=${w.rw}`,
    `--bs=${w.bs}`,
    `--numjobs=${w.numjobs}`,
    ...(seconds > 0 ? ["--time_based", `--runtime=${seconds}`] : []),
    ...extra,
  ];
  if (w.fdatasync) args.push("--fdatasync=1");
  const out = await run("fio", args);
  const json = JSON.parse(out.stdout.slice(out.stdout.indexOf("{"))) as {
    jobs: Array<{ read: FioSide; write: FioSide }>;
  };
  const job = json.jobs[0];
  if (!job) throw new Error("fio printed no job result");
  const sides = [job.read, job.write].filter((s) => s.io_bytes > 0);
  const lat = sides.length
    ? sides.reduce((a, s) => a + (s.clat_ns?.mean ?? 0), 0) / sides.length / 1000
    : NaN;
  return {
    bw: job.read.bw_bytes + job.write.bw_bytes,
    iops: job.read.iops + job.write.iops,
    latUs: lat,
    ios: job.read.total_ios + job.write.total_ios,
  };
}

/** Writes the whole file once (1 MiB sequential, direct), then fsyncs: the untimed prefill. */
export async function fillFile(file: string, size: number): Promise<void> {
  await run("fio", [
    "--name=prefill",
    ...fioArgs(file, size),
    "--rw=write",
    "--bs=1M",
    "--end_fsync=1",
  ]);
}
