import { AddCowError } from "../util/errors";

/** Longest backing or data file name a qcow2 header may hold (QEMU's limit). */
export const MAX_NAME_BYTES = 1023;

/** How a qcow2 reader reports a field it refuses: one line, with the field and its offset. */
export const DAMAGED = "the qcow2 file is damaged or not a qcow2 image";

/** One-line refusal naming the field at fault. */
export function badField(
  file: string,
  field: string,
  offset: number,
  message: string,
  advice = DAMAGED,
): AddCowError {
  return new AddCowError(`${file}: qcow2 ${field} ${message}; ${advice}`, {
    file,
    field,
    offset,
    reason: "bad-field",
    code: "EINVAL",
  });
}

/** A text field from the file, quoted so control characters cannot break the message line. */
export function quote(text: string): string {
  return JSON.stringify(text).replace(
    /[\u007f-\u009f]/g,
    (ch) => `\\u${ch.charCodeAt(0).toString(16).padStart(4, "0")}`,
  );
}

const utf8 = new TextDecoder("utf-8", { fatal: true });

export function decodeName(bytes: Buffer, file: string, field: string, offset: number): string {
  let text: string;
  try {
    text = utf8.decode(bytes);
  } catch {
    throw badField(file, field, offset, `is not valid UTF-8`);
  }
  if ([...text].some((ch) => ch.charCodeAt(0) < 0x20 || ch === "\x7f")) {
    throw badField(file, field, offset, `${quote(text)} contains a control character`);
  }
  if (text === "") throw badField(file, field, offset, `is empty`);
  return text;
}
