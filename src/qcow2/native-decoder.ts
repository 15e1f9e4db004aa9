import * as zlib from "node:zlib";

/**
 * A node:zlib decoder (raw inflate with a 4 KiB window, or zstd) that is kept
 * between clusters and writes straight into the caller's buffer.
 *
 * node:zlib's one-shot calls (inflateRawSync, zstdDecompressSync) build a
 * stream object, a native context (libzstd's is over 100 KiB) and an output
 * buffer on every call. Per 64 KiB cluster, that churn of native memory made
 * V8 run a full garbage collection every few tens of milliseconds in the
 * daemon: a third of its CPU, and random reads of compressed clusters at 3-4x
 * qemu-storage-daemon's CPU. So this drives the native handle under one such
 * stream directly (reset, then writeSync into given buffers: what the one-shot
 * calls do underneath), as npm's own minizlib does. Where a Node.js lacks that
 * handle, the one-shot calls are used instead: same results, more CPU.
 */
export interface Decoded {
  /** Bytes written to the output. */
  written: number;
  /** Bytes of input the decoder did not take. */
  inputLeft: number;
}

export class DecoderError extends Error {}

export interface Decoder {
  /** True when it is the reused native decoder, false for the one-shot fallback. */
  readonly reused: boolean;
  /**
   * Decodes `input` as one new stream (zlib) or frame (zstd) into `out`,
   * stopping when `out` is full; once it is, `more()` tells whether the
   * stream has output beyond it (then `out` holds nothing to use). Throws
   * DecoderError with libz's or libzstd's message.
   */
  decode(input: Buffer, out: Buffer): Decoded & { more(): boolean };
}

export type DecoderKind = "zlib" | "zstd";

/** zstd frames may not ask for a window larger than this (QEMU's use at most a cluster). */
export const MAX_ZSTD_WINDOW_LOG = 23;

interface NativeHandle {
  writeSync(
    flush: number,
    input: Buffer,
    inOff: number,
    inLen: number,
    out: Buffer,
    outOff: number,
    outLen: number,
  ): void;
  reset(): void;
  onerror: (message: string, errno: number) => void;
}

interface StreamInternals {
  _handle?: NativeHandle;
  _writeState?: Uint32Array;
  close(): void;
}

function newStream(kind: DecoderKind): zlib.InflateRaw | zlib.ZstdDecompress {
  return kind === "zlib"
    ? zlib.createInflateRaw({ windowBits: 12 })
    : zlib.createZstdDecompress({
        params: { [zlib.constants.ZSTD_d_windowLogMax]: MAX_ZSTD_WINDOW_LOG },
      });
}

const FLUSH: Record<DecoderKind, number> = {
  zlib: zlib.constants.Z_SYNC_FLUSH,
  zstd: zlib.constants.ZSTD_e_end,
};

class ReusedDecoder implements Decoder {
  readonly reused = true;
  private stream!: StreamInternals;
  private handle!: NativeHandle;
  private state!: Uint32Array;
  private failure: string | null = null;
  private readonly scratch = Buffer.alloc(1);

  constructor(private readonly kind: DecoderKind) {
    this.open();
  }

  /** True when this Node.js has the internals used here. */
  static available(kind: DecoderKind): boolean {
    const s = newStream(kind) as unknown as StreamInternals;
    const ok =
      typeof s._handle?.writeSync === "function" &&
      typeof s._handle.reset === "function" &&
      s._writeState instanceof Uint32Array &&
      s._writeState.length === 2;
    s.close();
    return ok;
  }

  private open(): void {
    this.stream = newStream(this.kind) as unknown as StreamInternals;
    this.handle = this.stream._handle!;
    this.state = this.stream._writeState!;
    // Replaces the stream's own handler, which would destroy the stream and emit 'error'.
    this.handle.onerror = (message) => {
      this.failure = message;
    };
  }

  private write(input: Buffer, inOff: number, out: Buffer): Decoded {
    this.failure = null;
    this.handle.writeSync(FLUSH[this.kind], input, inOff, input.length - inOff, out, 0, out.length);
    if (this.failure !== null) {
      const message = this.failure;
      // A failed native context is not trusted again.
      this.stream.close();
      this.open();
      throw new DecoderError(message);
    }
    return { written: out.length - this.state[0]!, inputLeft: this.state[1]! };
  }

  decode(input: Buffer, out: Buffer): Decoded & { more(): boolean } {
    this.handle.reset();
    const r = this.write(input, 0, out);
    return {
      ...r,
      more: () =>
        r.inputLeft > 0 && this.write(input, input.length - r.inputLeft, this.scratch).written > 0,
    };
  }
}

/** The one-shot calls, for a Node.js without the internals ReusedDecoder needs. */
class OneShotDecoder implements Decoder {
  readonly reused = false;

  constructor(private readonly kind: DecoderKind) {}

  decode(input: Buffer, out: Buffer): Decoded & { more(): boolean } {
    let result: Buffer;
    let tooLong = false;
    try {
      // One byte more than fits tells whether there is more.
      const options = { maxOutputLength: out.length + 1 };
      result =
        this.kind === "zlib"
          ? zlib.inflateRawSync(input, {
              ...options,
              windowBits: 12,
              finishFlush: zlib.constants.Z_SYNC_FLUSH,
            })
          : zlib.zstdDecompressSync(input, {
              ...options,
              params: { [zlib.constants.ZSTD_d_windowLogMax]: MAX_ZSTD_WINDOW_LOG },
            });
    } catch (err) {
      if ((err as { code?: string }).code !== "ERR_BUFFER_TOO_LARGE") {
        throw new DecoderError((err as Error).message);
      }
      tooLong = true;
      result = Buffer.alloc(0);
    }
    const written = tooLong ? out.length : Math.min(result.length, out.length);
    result.copy(out, 0, 0, written);
    const more = tooLong || result.length > out.length;
    return { written, inputLeft: 0, more: () => more };
  }
}

/** The fallback, for tests that compare it with the reused decoder. */
export function oneShotDecoder(kind: DecoderKind): Decoder {
  return new OneShotDecoder(kind);
}

const decoders = new Map<DecoderKind, Decoder>();

/**
 * The process's decoder of a kind. Every use is synchronous, start to end,
 * so one per kind serves all images.
 */
export function decoder(kind: DecoderKind): Decoder {
  let d = decoders.get(kind);
  if (!d) {
    d = ReusedDecoder.available(kind) ? new ReusedDecoder(kind) : new OneShotDecoder(kind);
    decoders.set(kind, d);
  }
  return d;
}
