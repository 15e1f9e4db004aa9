import * as crypto from "node:crypto";
import type { FileIO } from "../block/file-io";
import { type LayerIdentity, identityChanges, parseLayerIdentity } from "../block/layer-identity";
import { AddCowError } from "../util/errors";
import { type AddCowHeader, FEATURE_BACKING_PIN, HEADER_ALIGN } from "./header";

/**
 * The backing pin (docs/specs/add-cow.md, "The backing pin"): the identity of
 * the backing a disk was made on, kept in an extension of the .add-cow file
 * that older readers ignore. Compatible feature bit 1 says it is there: the
 * last PIN_AREA_SIZE bytes of the file, after the bitmap, are two slots of
 * 4096 bytes; the valid slot with the higher generation is the pin. A slot
 * is rewritten in place only while the other one holds the current pin, so a
 * torn write leaves the previous pin readable.
 *
 * A slot: magic "ACOWPIN1" (8), generation u64 (8), payload length u32 (4),
 * reserved u32 = 0 (4), SHA-256 of bytes 0..23 and the payload (32), the
 * payload (UTF-8 JSON, PinRecord), zeros to the end of the slot.
 */
export const PIN_AREA_SIZE = 8192;
const SLOT_SIZE = 4096;
const SLOT_MAGIC = Buffer.from("ACOWPIN1", "latin1");
const SLOT_HEADER = 56;
const MAX_PAYLOAD = SLOT_SIZE - SLOT_HEADER;
const PIN_VERSION = 1;

/** pinned: the backing must have `identity`. committing: a commit into it was under way. */
export type PinStatus = "pinned" | "committing";

export interface PinRecord {
  /** Random id of this disk (32 hex digits), kept by every rewrite: what a layer above pins of it. */
  disk: string;
  /** SHA-256 (hex) of the backing format and stored name the pin was taken for. */
  backingKey: string;
  identity: LayerIdentity;
  status: PinStatus;
  /** When it was taken (ISO 8601), for people. */
  pinnedAt: string;
}

export type PinState =
  /** Feature bit 1 clear: the disk has no pin (made before pins, or without a backing). */
  | { kind: "none" }
  | {
      kind: "pinned";
      record: PinRecord;
      generation: bigint;
      slot: 0 | 1;
      /** Where the extension starts: the bitmap ends here. */
      areaStart: number;
    }
  /** Feature bit 1 set but no valid slot: damaged, or cut by an older addcow's resize. */
  | { kind: "unreadable"; why: string };

export const NO_PIN: PinState = { kind: "none" };

/** What the pin was taken for: the backing as the header names it. */
export function backingKey(name: string, format: string): string {
  return crypto.createHash("sha256").update(`${format}\0${name}`).digest("hex");
}

export function newDiskId(): string {
  return crypto.randomBytes(16).toString("hex");
}

export function pinRecord(
  header: Pick<AddCowHeader, "backingName" | "backingFormat">,
  identity: LayerIdentity,
  disk: string = newDiskId(),
  status: PinStatus = "pinned",
): PinRecord {
  return {
    disk,
    backingKey: backingKey(header.backingName ?? "", header.backingFormat ?? ""),
    identity,
    status,
    pinnedAt: new Date().toISOString(),
  };
}

function slotDigest(head: Buffer, payload: Buffer): Buffer {
  return crypto.createHash("sha256").update(head.subarray(0, 24)).update(payload).digest();
}

export function encodeSlot(record: PinRecord, generation: bigint): Buffer {
  const payload = Buffer.from(JSON.stringify({ version: PIN_VERSION, ...record }), "utf8");
  if (payload.length > MAX_PAYLOAD) {
    throw new AddCowError(
      `the backing's identity is too long to pin (${payload.length} bytes, at most ${MAX_PAYLOAD}): give the manifest a shorter URL`,
      { reason: "invalid" },
    );
  }
  const slot = Buffer.alloc(SLOT_SIZE);
  SLOT_MAGIC.copy(slot, 0);
  slot.writeBigUInt64LE(generation, 8);
  slot.writeUInt32LE(payload.length, 16);
  slotDigest(slot, payload).copy(slot, 24);
  payload.copy(slot, SLOT_HEADER);
  return slot;
}

/** The whole extension as a rewrite of the file puts it: the pin in slot 0, slot 1 empty. */
export function encodePinArea(record: PinRecord, generation: bigint): Buffer {
  const area = Buffer.alloc(PIN_AREA_SIZE);
  encodeSlot(record, generation).copy(area, 0);
  return area;
}

/** One slot: its record, or why it is not a valid one. */
export function decodeSlot(slot: Buffer): { record: PinRecord; generation: bigint } | string {
  if (!slot.subarray(0, 8).equals(SLOT_MAGIC)) return "no pin slot magic";
  const length = slot.readUInt32LE(16);
  if (slot.readUInt32LE(20) !== 0 || length > MAX_PAYLOAD) return "the slot header is damaged";
  const payload = slot.subarray(SLOT_HEADER, SLOT_HEADER + length);
  if (!slotDigest(slot, payload).equals(slot.subarray(24, 56)))
    return "its checksum does not match";
  if (slot.subarray(SLOT_HEADER + length).some((b) => b !== 0)) return "bytes after its payload";
  try {
    return {
      record: parseRecord(JSON.parse(payload.toString("utf8"))),
      generation: slot.readBigUInt64LE(8),
    };
  } catch (err) {
    return `its record is not valid (${(err as Error).message})`;
  }
}

function parseRecord(v: unknown): PinRecord {
  if (typeof v !== "object" || v === null) throw new Error("not an object");
  const o = v as Record<string, unknown>;
  if (o.version !== PIN_VERSION)
    throw new Error(`version ${String(o.version)}, not ${PIN_VERSION}`);
  const hex = (x: unknown, n: number, what: string) => {
    if (typeof x !== "string" || x.length !== n || !/^[0-9a-f]*$/.test(x)) {
      throw new Error(`${what} is not ${n} hex digits`);
    }
    return x;
  };
  if (o.status !== "pinned" && o.status !== "committing") throw new Error("unknown status");
  if (typeof o.pinnedAt !== "string" || o.pinnedAt.length > 64) throw new Error("bad pinnedAt");
  return {
    disk: hex(o.disk, 32, "disk"),
    backingKey: hex(o.backingKey, 64, "backingKey"),
    identity: parseLayerIdentity(o.identity),
    status: o.status,
    pinnedAt: o.pinnedAt,
  };
}

/**
 * Reads the pin of an open .add-cow file of `fileSize` bytes. With feature
 * bit 1 clear there is none; with it set, the last PIN_AREA_SIZE bytes (at a
 * 4096-aligned offset after the header) must hold a valid slot.
 */
export async function readPinState(
  meta: FileIO,
  header: AddCowHeader,
  fileSize: number,
): Promise<PinState> {
  if ((header.compatibleFeatures & FEATURE_BACKING_PIN) === 0n) return NO_PIN;
  const areaStart = fileSize - PIN_AREA_SIZE;
  if (areaStart < header.headerSize || fileSize % HEADER_ALIGN !== 0) {
    return {
      kind: "unreadable",
      why: `the file (${fileSize} bytes) has no room for it at its end`,
    };
  }
  const area = Buffer.alloc(PIN_AREA_SIZE);
  const n = await meta.read(area, areaStart);
  if (n < PIN_AREA_SIZE) return { kind: "unreadable", why: "the file ends inside it" };
  const slots = [0, 1].map((i) => decodeSlot(area.subarray(i * SLOT_SIZE, (i + 1) * SLOT_SIZE)));
  let best: Extract<PinState, { kind: "pinned" }> | null = null;
  for (const i of [0, 1] as const) {
    const s = slots[i]!;
    if (typeof s !== "string" && (best === null || s.generation > best.generation)) {
      best = { kind: "pinned", ...s, slot: i, areaStart };
    }
  }
  return (
    best ?? { kind: "unreadable", why: `slot 0: ${String(slots[0])}; slot 1: ${String(slots[1])}` }
  );
}

/**
 * Replaces the pin in place: the new record goes to the slot that does not
 * hold the current one, with the next generation, and is synced. A crash
 * before the sync leaves the current pin readable (the other slot untouched).
 */
export async function writePinSlot(
  meta: FileIO,
  current: Extract<PinState, { kind: "pinned" }>,
  record: PinRecord,
): Promise<Extract<PinState, { kind: "pinned" }>> {
  const slot = current.slot === 0 ? 1 : 0;
  const generation = current.generation + 1n;
  await meta.write(encodeSlot(record, generation), current.areaStart + slot * SLOT_SIZE);
  await meta.sync();
  return { kind: "pinned", record, generation, slot, areaStart: current.areaStart };
}

/** The advice every refusal of a pin ends with: how to accept the backing on purpose. */
export function repinAdvice(file: string, backing: string, format: string): string {
  return `if it is meant to be the base now, accept it on purpose (guest data may not match it) with: addcow rebase -u -b ${backing} -F ${format} ${file}`;
}

/**
 * Compares the backing a disk is opened on with its pin; throws one line
 * that says what changed and how to accept it. Nothing to compare without a
 * pin; a pin left "committing" by an interrupted commit accepts any change of
 * the backing (the overlay hides every cluster that commit writes).
 */
export function checkPin(
  file: string,
  header: AddCowHeader,
  backingPath: string,
  state: PinState,
  now: LayerIdentity | null,
): void {
  if (state.kind === "none" || header.backingName === null) return;
  const format = header.backingFormat ?? "raw";
  const advice = repinAdvice(file, backingPath, format);
  const fail = (what: string) =>
    new AddCowError(`${file}: ${what}; ${advice}`, {
      file,
      code: "EINVAL",
      reason: "changed-backing",
    });
  if (state.kind === "unreadable") {
    throw fail(
      `the pin of backing file ${backingPath} (compatible feature bit 1) cannot be read: ${state.why} (an addcow without pins resized the disk, or the file is damaged)`,
    );
  }
  const rec = state.record;
  if (rec.backingKey !== backingKey(header.backingName, format)) {
    throw fail(
      `its pin was taken for another backing file than ${backingPath} (an addcow without pins changed the backing name)`,
    );
  }
  if (rec.status === "committing") return;
  if (now === null) throw fail(`backing file ${backingPath} cannot tell its identity`);
  const changes = identityChanges(rec.identity, now);
  if (changes.length > 0) {
    throw fail(
      `backing file ${backingPath} is not the one this disk was made on (${changes.join("; ")}): the guest data in the disk was written over the other one, so the disk is not opened`,
    );
  }
}
