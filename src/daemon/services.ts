import type { MountDaemon } from "./daemon";

/**
 * Extra parts a daemon runs while mounted (e.g. the control socket for live
 * jobs). A factory is called once the disks are mounted, before the daemon
 * reports ready; a factory that throws fails the mount. stop() is called
 * first when the daemon stops, before the disks are flushed and closed.
 */
export interface DaemonService {
  stop(): Promise<void>;
}

export type DaemonServiceFactory = (daemon: MountDaemon) => Promise<DaemonService>;

const factories: DaemonServiceFactory[] = [];

/** Registers a service every daemon started afterwards runs. */
export function registerDaemonService(factory: DaemonServiceFactory): void {
  factories.push(factory);
}

export function daemonServiceFactories(): readonly DaemonServiceFactory[] {
  return factories;
}
