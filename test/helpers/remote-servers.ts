/**
 * Real servers for remote-backing tests, started and stopped by the test
 * (cleanupAll() stops them): nginx from Debian with a generated config on a
 * free port (optionally TLS with a certificate made here by openssl, optionally
 * a bearer token), s3rver (SigV4) with a bucket made here, and a small
 * fault-injecting proxy that counts requests and can delay, fail, cut or stop.
 */
import * as fs from "node:fs";
import * as http from "node:http";
import * as net from "node:net";
import * as path from "node:path";
import { spawn } from "node:child_process";
import { deferCleanup, sh, tempDir, trackChild, waitFor, writePatternFile } from "./mount";

export async function freePort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const srv = net.createServer();
    srv.listen(0, "127.0.0.1", () => {
      const port = (srv.address() as net.AddressInfo).port;
      srv.close(() => resolve(port));
    });
    srv.on("error", reject);
  });
}

function portOpen(port: number): Promise<boolean> {
  return new Promise((resolve) => {
    const s = net.connect(port, "127.0.0.1");
    s.on("connect", () => {
      s.destroy();
      resolve(true);
    });
    s.on("error", () => resolve(false));
  });
}

export interface NginxServer {
  /** http(s)://127.0.0.1:PORT/ : files of `root` below it. */
  baseUrl: string;
  port: number;
  /** PEM of the self-signed certificate (TLS only), for ADDCOW_CA_FILE. */
  caFile: string | null;
  /** Requests served so far, from the access log: "METHOD URI RANGE STATUS BYTES". */
  requests(): string[];
  stop(): Promise<void>;
  start(): Promise<void>;
}

/** Makes a self-signed certificate for 127.0.0.1 in dir. */
export async function selfSignedCert(dir: string): Promise<{ cert: string; key: string }> {
  const cert = path.join(dir, "cert.pem");
  const key = path.join(dir, "key.pem");
  await sh("openssl", [
    "req",
    "-x509",
    "-newkey",
    "rsa:2048",
    "-nodes",
    "-days",
    "2",
    "-keyout",
    key,
    "-out",
    cert,
    "-subj",
    "/CN=127.0.0.1",
    "-addext",
    "subjectAltName=IP:127.0.0.1",
  ]);
  return { cert, key };
}

/**
 * nginx (never the system service: its own config, prefix and pid file in dir)
 * serving `root` with byte ranges; one process (master_process off) as root.
 */
export async function startNginx(
  dir: string,
  root: string,
  opts: {
    tls?: boolean;
    bearer?: string;
    /** Lines for the server block, and for the http block. */
    extra?: string;
    http?: string;
    /** No `location /` of the static files (extra has its own). */
    noDefaultLocation?: boolean;
  } = {},
  onCleanup: (fn: () => Promise<void>) => void = deferCleanup,
): Promise<NginxServer> {
  const port = await freePort();
  const conf = path.join(dir, "nginx.conf");
  const accessLog = path.join(dir, "access.log");
  fs.mkdirSync(path.join(dir, "tmp"), { recursive: true });
  const tls = opts.tls ? await selfSignedCert(dir) : null;
  const auth = opts.bearer
    ? `if ($http_authorization != "Bearer ${opts.bearer}") { return 401; }`
    : "";
  fs.writeFileSync(
    conf,
    `daemon off;
master_process off;
worker_processes 1;
pid ${dir}/nginx.pid;
error_log ${dir}/error.log warn;
events { worker_connections 256; }
http {
  log_format ranges '$request_method $uri "$http_range" $status $body_bytes_sent $upstream_cache_status';
  access_log ${accessLog} ranges;
  client_body_temp_path ${dir}/tmp/body;
  proxy_temp_path ${dir}/tmp/proxy;
  fastcgi_temp_path ${dir}/tmp/fastcgi;
  uwsgi_temp_path ${dir}/tmp/uwsgi;
  scgi_temp_path ${dir}/tmp/scgi;
  default_type application/octet-stream;
  keepalive_requests 100000;
  ${opts.http ?? ""}
  server {
    listen 127.0.0.1:${port}${tls ? " ssl" : ""};
    ${tls ? `ssl_certificate ${tls.cert}; ssl_certificate_key ${tls.key};` : ""}
    root ${root};
    ${opts.extra ?? ""}
    ${opts.noDefaultLocation ? "" : `location / { ${auth} }`}
  }
}
`,
  );
  let child: ReturnType<typeof spawn> | null = null;
  const server: NginxServer = {
    baseUrl: `${tls ? "https" : "http"}://127.0.0.1:${port}/`,
    port,
    caFile: tls?.cert ?? null,
    requests() {
      if (!fs.existsSync(accessLog)) return [];
      return fs
        .readFileSync(accessLog, "utf8")
        .split("\n")
        .filter((l) => l !== "");
    },
    async start() {
      child = spawn("nginx", ["-p", dir, "-c", conf], { stdio: "ignore" });
      if (onCleanup === deferCleanup) trackChild(child);
      await waitFor(`nginx on port ${port}`, () => portOpen(port));
    },
    async stop() {
      const c = child;
      child = null;
      if (!c || c.exitCode !== null) return;
      c.kill("SIGTERM");
      await waitFor("nginx to stop", () => c.exitCode !== null || c.signalCode !== null);
    },
  };
  await server.start();
  onCleanup(() => server.stop());
  return server;
}

/** Body bytes an nginx sent for `uri` (its access log lines), the one-byte probes left out. */
export function servedBytes(lines: string[], uri: string): number {
  return lines
    .filter((l) => l.startsWith(`GET ${uri} `) && !l.includes('"bytes=0-0"'))
    .reduce((sum, l) => sum + Number(l.split(" ")[4]), 0);
}

/** A fresh temp dir with www/base.raw (pattern data) and an nginx serving it. */
export async function servedBase(
  bytes: number,
  seed: number,
  opts: { tls?: boolean; bearer?: string } = {},
) {
  const dir = tempDir();
  const www = path.join(dir, "www");
  fs.mkdirSync(www);
  const base = path.join(www, "base.raw");
  writePatternFile(base, bytes, seed);
  const nginx = await startNginx(path.join(dir, "nginx-run"), www, opts);
  return { dir, base, nginx, url: `${nginx.baseUrl}base.raw` };
}

export const S3_ACCESS_KEY = "S3RVER";
export const S3_SECRET_KEY = "S3RVER";

export interface S3Server {
  endpoint: string;
  /** The environment a client needs: credentials, endpoint, region. */
  env: NodeJS.ProcessEnv;
  put(bucket: string, key: string, file: string): Promise<void>;
  stop(): Promise<void>;
}

/** s3rver (SigV4 checked) on a free port, with the given buckets. */
export async function startS3(dir: string, buckets: string[]): Promise<S3Server> {
  const S3rver = require("s3rver") as new (opts: Record<string, unknown>) => {
    run(): Promise<{ port: number }>;
    close(): Promise<void>;
  };
  const srv = new S3rver({
    address: "127.0.0.1",
    port: 0,
    silent: true,
    directory: dir,
    configureBuckets: buckets.map((name) => ({ name })),
  });
  const { port } = await srv.run();
  const endpoint = `http://127.0.0.1:${port}`;
  const env = {
    AWS_ACCESS_KEY_ID: S3_ACCESS_KEY,
    AWS_SECRET_ACCESS_KEY: S3_SECRET_KEY,
    AWS_REGION: "us-east-1",
    ADDCOW_S3_ENDPOINT: endpoint,
  };
  let stopped = false;
  const server: S3Server = {
    endpoint,
    env,
    async put(bucket, key, file) {
      const { S3Client, PutObjectCommand } =
        require("@aws-sdk/client-s3") as typeof import("@aws-sdk/client-s3");
      const client = new S3Client({
        endpoint,
        region: "us-east-1",
        forcePathStyle: true,
        credentials: { accessKeyId: S3_ACCESS_KEY, secretAccessKey: S3_SECRET_KEY },
      });
      try {
        await client.send(
          new PutObjectCommand({ Bucket: bucket, Key: key, Body: fs.readFileSync(file) }),
        );
      } finally {
        client.destroy();
      }
    },
    async stop() {
      if (stopped) return;
      stopped = true;
      await srv.close();
    },
  };
  deferCleanup(() => server.stop());
  return server;
}

export type ProxyMode =
  | { kind: "pass" }
  | { kind: "delay"; ms: number }
  /** Answers `status` (with `body`, e.g. an S3 XML error); after `times` answers, passes again. */
  | { kind: "status"; status: number; body?: string; times?: number }
  /** Sends the headers and part of the body, then drops the connection. */
  | { kind: "cut" }
  /** Accepts connections and never answers. */
  | { kind: "hang" }
  /**
   * Forwards answers with the byte at each object offset in `at` flipped
   * (headers, ETag included, unchanged): a mirror serving wrong bytes.
   */
  | { kind: "corrupt"; at: number[] };

export interface FaultProxy {
  url: string;
  port: number;
  mode: ProxyMode;
  /** Response headers replaced in every forwarded answer (e.g. a fixed ETag). */
  rewrite: Record<string, string>;
  /** Requests forwarded (or refused) so far, and body bytes sent to clients. */
  requests: number;
  bytes: number;
  stop(): Promise<void>;
}

/**
 * An HTTP proxy in front of `upstream` (http only) that forwards requests
 * unchanged (the Host header too, so SigV4 signatures stay valid) and can
 * add latency, answer an error status, cut answers short or hang.
 */
export async function startProxy(
  upstream: string,
  mode: ProxyMode = { kind: "pass" },
  onCleanup: (fn: () => Promise<void>) => void = deferCleanup,
) {
  const up = new URL(upstream);
  const sockets = new Set<net.Socket>();
  const proxy: FaultProxy = {
    url: "",
    port: 0,
    mode,
    rewrite: {},
    requests: 0,
    bytes: 0,
    async stop() {
      for (const s of sockets) s.destroy();
      await new Promise<void>((resolve) => server.close(() => resolve()));
    },
  };
  const server = http.createServer((req, res) => {
    proxy.requests++;
    const m = proxy.mode;
    if (m.kind === "hang") return;
    if (m.kind === "status") {
      if (m.times !== undefined && --m.times <= 0) proxy.mode = { kind: "pass" };
      const body = Buffer.from(m.body ?? "");
      res.writeHead(m.status, {
        "content-length": String(body.length),
        ...(m.body ? { "content-type": "application/xml" } : {}),
      });
      res.end(body);
      return;
    }
    const forward = () => {
      const upReq = http.request(
        {
          host: up.hostname,
          port: up.port,
          method: req.method,
          path: req.url,
          headers: req.headers,
        },
        (upRes) => {
          res.writeHead(upRes.statusCode ?? 502, { ...upRes.headers, ...proxy.rewrite });
          if (m.kind === "cut") {
            upRes.once("data", (chunk: Buffer) => {
              res.write(chunk.subarray(0, Math.max(1, chunk.length >> 1)));
              proxy.bytes += chunk.length >> 1;
              res.destroy();
              upRes.destroy();
            });
            return;
          }
          upRes.on("data", (chunk: Buffer) => (proxy.bytes += chunk.length));
          if (m.kind === "corrupt") {
            // Where the body starts in the object: a 206's Content-Range, else 0.
            const cr = /^bytes (\d+)-/.exec(String(upRes.headers["content-range"] ?? ""));
            let pos = cr ? Number(cr[1]) : 0;
            upRes.on("data", (chunk: Buffer) => {
              const out = Buffer.from(chunk);
              for (const at of m.at) {
                if (at >= pos && at < pos + out.length) out[at - pos] = out[at - pos]! ^ 0xff;
              }
              pos += chunk.length;
              res.write(out);
            });
            upRes.on("end", () => res.end());
            return;
          }
          upRes.pipe(res);
        },
      );
      upReq.on("error", () => res.destroy());
      req.pipe(upReq);
    };
    if (m.kind === "delay") setTimeout(forward, m.ms);
    else forward();
  });
  server.on("connection", (s) => {
    sockets.add(s);
    s.on("close", () => sockets.delete(s));
  });
  await new Promise<void>((resolve) => server.listen(0, "127.0.0.1", resolve));
  proxy.port = (server.address() as net.AddressInfo).port;
  proxy.url = `http://127.0.0.1:${proxy.port}`;
  onCleanup(() => proxy.stop());
  return proxy;
}

/** One request a {@link Redirector} saw. */
export interface SeenRequest {
  path: string;
  authorization: string | null;
  range: string | null;
}

export interface Redirector {
  /** http://HOST:PORT (no trailing slash). */
  origin: string;
  seen: SeenRequest[];
  stop(): Promise<void>;
}

/**
 * A small server on `host` (127.0.0.x) that answers every request with
 * `route(path)`: a redirect ({ status, location }), or "pass": the request is
 * forwarded to `upstream` (its Range header too) and the answer relayed. It
 * records each request's path and Authorization header.
 */
export async function startRedirector(
  host: string,
  route: (
    path: string,
    req: http.IncomingMessage,
  ) => { status: number; location?: string } | "pass",
  upstream?: string,
): Promise<Redirector> {
  const seen: SeenRequest[] = [];
  const sockets = new Set<net.Socket>();
  const server = http.createServer((req, res) => {
    const p = req.url ?? "/";
    seen.push({
      path: p,
      authorization: req.headers.authorization ?? null,
      range: req.headers.range ?? null,
    });
    const r = route(p, req);
    if (r !== "pass") {
      res.writeHead(r.status, {
        "content-length": "0",
        ...(r.location !== undefined ? { location: r.location } : {}),
      });
      res.end();
      return;
    }
    const up = new URL(upstream!);
    const upReq = http.request(
      {
        host: up.hostname,
        port: up.port,
        method: req.method,
        path: up.pathname,
        headers: { ...(req.headers.range ? { range: req.headers.range } : {}) },
      },
      (upRes) => {
        res.writeHead(upRes.statusCode ?? 502, upRes.headers);
        upRes.pipe(res);
      },
    );
    upReq.on("error", () => res.destroy());
    upReq.end();
  });
  server.on("connection", (s) => {
    sockets.add(s);
    s.on("close", () => sockets.delete(s));
  });
  await new Promise<void>((resolve) => server.listen(0, host, resolve));
  const port = (server.address() as net.AddressInfo).port;
  const r: Redirector = {
    origin: `http://${host}:${port}`,
    seen,
    async stop() {
      for (const s of sockets) s.destroy();
      await new Promise<void>((resolve) => server.close(() => resolve()));
    },
  };
  deferCleanup(() => r.stop());
  return r;
}

/**
 * The rack tier of docs/remote.md: nginx with proxy_cache and the slice
 * module in front of `origin`, caching `slice`-sized ranges (identity headers
 * passed through). Its own access log shows hits and misses.
 */
export async function startCachingProxy(
  dir: string,
  origin: string,
  slice = "1m",
): Promise<NginxServer> {
  fs.mkdirSync(path.join(dir, "cache"), { recursive: true });
  const extra = `
    location / {
      slice ${slice};
      proxy_cache rack;
      proxy_cache_key $uri$is_args$args$slice_range;
      proxy_set_header Range $slice_range;
      proxy_cache_valid 200 206 1h;
      proxy_cache_lock on;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_pass ${origin};
    }`;
  return startNginx(dir, path.join(dir, "cache"), {
    extra,
    http: `proxy_cache_path ${dir}/cache levels=1:2 keys_zone=rack:10m max_size=1g inactive=1h use_temp_path=off;`,
    noDefaultLocation: true,
  });
}
