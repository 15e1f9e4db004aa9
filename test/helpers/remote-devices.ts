/**
 * Opening remote devices in tests the way a daemon does (settings from an
 * environment), with their warnings collected instead of printed, and the
 * one-line refusal a failing open or read must give.
 */
import { expect } from "vitest";
import { openRemoteDevice } from "../../src/remote/open-remote-device";
import { remoteSettingsFromEnv } from "../../src/remote/options";
import type { RemoteDevice } from "../../src/remote/remote-device";
import { AddCowError } from "../../src/util/errors";

/** A RemoteDevice on `url` with settings from `env`; its warnings go to `warnings`. */
export function openDevice(
  url: string,
  env: NodeJS.ProcessEnv,
  warnings: string[] = [],
): Promise<RemoteDevice> {
  const s = remoteSettingsFromEnv(env);
  s.device = { ...s.device, warn: (m) => warnings.push(m) };
  return openRemoteDevice(url, s);
}

/** The AddCowError p rejects with; it must be one line. */
export async function refused(p: Promise<unknown>): Promise<AddCowError> {
  const err = await p.then(
    () => null,
    (e: unknown) => e,
  );
  expect(err).toBeInstanceOf(AddCowError);
  expect((err as Error).message).not.toMatch(/\n/);
  return err as AddCowError;
}
