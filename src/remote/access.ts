import type { LookupFunction } from "node:net";

/**
 * What may be done for one remote backing name, as the chain decided it
 * (chain/url-policy.ts: URLs and credentials are the operator's
 * capabilities, not the disk file's). remote/ only obeys it:
 *
 * - `hop` is asked for every URL a request goes to: the disk's own URL and,
 *   for a client that follows redirects, every hop. A hop that is not
 *   allowed is not contacted (its `why` is the message); `credentials` says
 *   whether the operator's credentials (ADDCOW_HTTP_TOKEN, basic auth, the
 *   auth file's entry) may go with the request to that URL;
 * - `lookup`, when set, resolves every host a connection is made to: it
 *   checks every address the name has and hands the connection exactly the
 *   addresses it checked (so a name that changes its answer between the
 *   check and the connect, DNS rebinding, cannot slip through). Give it to
 *   undici as `connect: { lookup }` (net.connect's option);
 * - `signed`: S3 requests may be signed with the operator's AWS credentials;
 *   when false they go unsigned and the credential chain is never consulted.
 */
export interface RemoteAccess {
  hop(url: URL): HopDecision;
  readonly lookup: LookupFunction | null;
  readonly signed: boolean;
}

export type HopDecision = { allowed: true; credentials: boolean } | { allowed: false; why: string };

/** The operator's own URLs: anything, with the operator's credentials (as before issue 19). */
export const OPERATOR_ACCESS: RemoteAccess = {
  hop: () => ({ allowed: true, credentials: true }),
  lookup: null,
  signed: true,
};
