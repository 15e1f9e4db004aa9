// The part of fuse-native 2.2.6 we use (the package ships no types).
declare module "fuse-native" {
  type Cb = (result: number, ...rest: unknown[]) => void;

  interface FuseOpts {
    /** false: never answer a request with ETIMEDOUT while its I/O is still running. */
    timeout?: number | false;
    mkdir?: boolean;
    force?: boolean;
    [key: string]: unknown;
  }

  class Fuse {
    constructor(mnt: string, ops: Record<string, unknown>, opts?: FuseOpts);
    readonly mnt: string;
    opts: FuseOpts;
    mount(cb: (err: Error | null) => void): void;
    unmount(cb: (err: Error | null) => void): void;
    /** Builds the "-o..." argument handed to libfuse; subclasses override it. */
    _fuseOptions(): string;
    static unmount(mnt: string, cb: (err: Error | null) => void): void;
    static readonly ENOENT: number;
  }
  export = Fuse;
  export type { Cb, FuseOpts };
}
