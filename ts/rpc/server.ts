// JSON-RPC 2.0 over a unix socket, with the wire behaviour of SPDK's RPC server so that SPDK's
// own client (`spdk-rpc`, rpc.py) drives it unchanged: one JSON text per request and nothing
// else, responses in request order per connection, batches, notifications, SPDK's error codes,
// and a connection that sent something that is not JSON answered with -32700 and closed.

import { chmod, lstat, unlink } from 'node:fs/promises';
import { connect, createServer, type Server, type Socket } from 'node:net';
import { isMainThread } from 'node:worker_threads';

import { JsonSplitter, StreamError } from './splitter.js';

/** JSON-RPC 2.0 error codes as SPDK uses them; method failures use a negative errno instead. */
export const RpcErrorCode = {
  PARSE_ERROR: -32700,
  INVALID_REQUEST: -32600,
  METHOD_NOT_FOUND: -32601,
  INVALID_PARAMS: -32602,
  INTERNAL_ERROR: -32603,
} as const;

/** Negative errno values the methods answer with (SPDK returns -errno from its C functions). */
export const Errno = {
  ENOENT: -2,
  EIO: -5,
  EEXIST: -17,
  ENODEV: -19,
  EINVAL: -22,
  EOPNOTSUPP: -95,
  ECONNREFUSED: -111,
} as const;

/** Largest request accepted (one JSON text, or one batch); a longer one ends the connection. */
export const DEFAULT_MAX_REQUEST_BYTES = 1 << 20;

export class RpcError extends Error {
  constructor(
    readonly code: number,
    message: string,
    readonly data?: unknown,
  ) {
    super(message);
    this.name = 'RpcError';
  }
}

/** A parameter error: names the parameter and what it should have been. */
export function invalidParams(message: string): RpcError {
  return new RpcError(RpcErrorCode.INVALID_PARAMS, message);
}

export type JsonValue = null | boolean | number | string | JsonValue[] | { [key: string]: JsonValue };
export type RpcParams = Record<string, unknown>;
export type RpcId = string | number | null;

export type RpcHandler = (params: RpcParams) => Promise<unknown> | unknown;

export interface RpcServerOptions {
  /** Socket path to create. */
  path: string;
  /** File mode of the socket (default 0o600: only the owner may connect). */
  mode?: number;
  /** One line per call: method, parameters, result or error, duration. */
  log?: (line: string) => void;
  /** Largest request in bytes (default 1 MiB). */
  maxRequestBytes?: number;
}

interface RpcResponse {
  jsonrpc: '2.0';
  id: RpcId;
  result?: unknown;
  error?: { code: number; message: string; data?: unknown };
}

const SUMMARY_CHARS = 200;

function summary(value: unknown): string {
  let s: string;
  try {
    s = JSON.stringify(value) ?? 'undefined';
  } catch {
    s = String(value);
  }
  return s.length > SUMMARY_CHARS ? `${s.slice(0, SUMMARY_CHARS)}...` : s;
}

function isValidId(id: unknown): id is RpcId {
  return id === null || typeof id === 'string' || (typeof id === 'number' && Number.isFinite(id));
}

function errorResponse(id: RpcId, code: number, message: string, data?: unknown): RpcResponse {
  const error: RpcResponse['error'] = { code, message };
  if (data !== undefined) error.data = data;
  return { jsonrpc: '2.0', id, error };
}

/**
 * The protocol half: sockets, framing, dispatch, ordering. Methods are registered by name; a
 * handler gets the `params` object (empty when the request had none) and returns the result or
 * throws an RpcError (any other error becomes -32603 with its message).
 */
export class JsonRpcServer {
  readonly path: string;
  private readonly methods = new Map<string, RpcHandler>();
  private readonly server: Server;
  private readonly sockets = new Set<Socket>();
  private readonly log: ((line: string) => void) | undefined;
  private readonly maxRequestBytes: number;
  private closing: Promise<void> | undefined;

  private constructor(server: Server, options: RpcServerOptions) {
    this.server = server;
    this.path = options.path;
    this.log = options.log;
    this.maxRequestBytes = options.maxRequestBytes ?? DEFAULT_MAX_REQUEST_BYTES;
    server.on('connection', (sock) => this.serve(sock));
  }

  /** Creates the socket (see `prepareSocketPath`) and starts accepting connections. */
  static async listen(options: RpcServerOptions): Promise<JsonRpcServer> {
    const mode = options.mode ?? 0o600;
    if (!Number.isInteger(mode) || mode < 0 || mode > 0o777) {
      throw new RangeError(`mode must be a file mode from 0 to 0o777, got ${String(options.mode)}`);
    }
    if (options.maxRequestBytes !== undefined && (!Number.isSafeInteger(options.maxRequestBytes) || options.maxRequestBytes < 1)) {
      throw new RangeError(`maxRequestBytes must be a positive integer, got ${String(options.maxRequestBytes)}`);
    }
    await prepareSocketPath(options.path);
    const server = createServer({ allowHalfOpen: true });
    const rpc = new JsonRpcServer(server, options);
    await new Promise<void>((resolve, reject) => {
      server.once('error', reject);
      // The socket is bound inside listen(): a umask that leaves only `mode` closes the window
      // in which it would carry the process's usual permissions. The umask is per process and
      // cannot be set from a worker thread; there the chmod below is all there is.
      const oldMask = isMainThread ? process.umask(0o777 & ~mode) : undefined;
      try {
        server.listen(options.path, () => {
          server.removeListener('error', reject);
          resolve();
        });
      } finally {
        if (oldMask !== undefined) process.umask(oldMask);
      }
    });
    try {
      await chmod(options.path, mode);
    } catch (e) {
      await rpc.close();
      throw e;
    }
    return rpc;
  }

  register(name: string, handler: RpcHandler): void {
    this.methods.set(name, handler);
  }

  get methodNames(): string[] {
    return [...this.methods.keys()].sort();
  }

  /** Connections now open. */
  get connections(): number {
    return this.sockets.size;
  }

  /** Stops accepting, ends every connection and removes the socket file. */
  close(): Promise<void> {
    this.closing ??= (async () => {
      const closed = new Promise<void>((resolve) => this.server.close(() => resolve()));
      for (const s of this.sockets) s.destroy();
      await closed;
      // libuv unlinks a socket it bound when it closes; this is for the case it did not.
      await unlink(this.path).catch(() => undefined);
    })();
    return this.closing;
  }

  private serve(sock: Socket): void {
    this.sockets.add(sock);
    const splitter = new JsonSplitter(this.maxRequestBytes);
    // Requests of one connection run one after another, so responses leave in request order
    // and a request sees the effects of the ones before it (attach, then get_devices).
    let chain: Promise<void> = Promise.resolve();
    let gone = false;
    /** No further reads are looked at (a stream error was found). */
    let ending = false;
    /** The connection is being closed for bad JSON: queued requests are dropped. */
    let fatal = false;
    const send = (payload: unknown): void => {
      // A client that went away mid-request: the method has finished, its answer is dropped.
      if (gone || sock.destroyed) return;
      sock.write(`${JSON.stringify(payload)}\n`);
    };
    sock.on('close', () => {
      gone = true;
      this.sockets.delete(sock);
    });
    sock.on('error', () => {
      // ECONNRESET and friends: 'close' follows and does the bookkeeping.
    });
    sock.on('end', () => {
      // The client is done sending; answer what it asked, then close our side.
      chain = chain.then(() => {
        if (!gone) sock.end();
      });
    });
    sock.on('data', (chunk: Buffer) => {
      if (ending) return;
      let texts: string[];
      let failure: StreamError | undefined;
      try {
        texts = splitter.push(chunk);
      } catch (e) {
        if (!(e instanceof StreamError)) throw e;
        // The requests completed before the bad bytes still get their answers, first.
        texts = [];
        failure = e;
      }
      for (const text of texts) {
        chain = chain.then(async () => {
          if (fatal) return;
          if (!(await this.handleText(text, send))) {
            // Not JSON after all: SPDK closes the connection too, the stream position cannot
            // be trusted any more. Later requests of the same read are not answered.
            fatal = true;
            ending = true;
            sock.end();
          }
        });
      }
      if (failure) {
        const f = failure;
        ending = true;
        chain = chain.then(() => {
          if (fatal) return;
          fatal = true;
          this.log?.(`rpc connection closed: ${f.message}`);
          send(errorResponse(null, RpcErrorCode.PARSE_ERROR, `Parse error: ${f.message}`));
          sock.end();
        });
      }
    });
  }

  /** Answers one JSON text; false when it was not JSON (the -32700 has been sent). */
  private async handleText(text: string, send: (payload: unknown) => void): Promise<boolean> {
    let message: unknown;
    try {
      message = JSON.parse(text);
    } catch (e) {
      this.log?.(`rpc connection closed: invalid JSON (${(e as Error).message})`);
      send(errorResponse(null, RpcErrorCode.PARSE_ERROR, `Parse error: ${(e as Error).message}`));
      return false;
    }
    if (Array.isArray(message)) {
      if (message.length === 0) {
        send(errorResponse(null, RpcErrorCode.INVALID_REQUEST, 'Invalid request: empty batch'));
        return true;
      }
      const responses: RpcResponse[] = [];
      for (const item of message) {
        const r = await this.handleRequest(item);
        if (r) responses.push(r);
      }
      // A batch of notifications only gets nothing back (JSON-RPC 2.0, section 6).
      if (responses.length > 0) send(responses);
      return true;
    }
    const r = await this.handleRequest(message);
    if (r) send(r);
    return true;
  }

  /** One request object; undefined for a notification. */
  private async handleRequest(req: unknown): Promise<RpcResponse | undefined> {
    if (typeof req !== 'object' || req === null || Array.isArray(req)) {
      return errorResponse(null, RpcErrorCode.INVALID_REQUEST, 'Invalid request: expected a JSON object');
    }
    const r = req as Record<string, unknown>;
    const hasId = 'id' in r;
    const id: RpcId = hasId && isValidId(r.id) ? r.id : null;
    if (hasId && !isValidId(r.id)) {
      return errorResponse(null, RpcErrorCode.INVALID_REQUEST, 'Invalid request: id must be a string, a number or null');
    }
    if (r.jsonrpc !== '2.0') {
      return errorResponse(id, RpcErrorCode.INVALID_REQUEST, 'Invalid request: "jsonrpc" must be "2.0"');
    }
    if (typeof r.method !== 'string') {
      return errorResponse(id, RpcErrorCode.INVALID_REQUEST, 'Invalid request: "method" must be a string');
    }
    const method = r.method;
    const started = process.hrtime.bigint();
    const elapsed = (): string => `${(Number(process.hrtime.bigint() - started) / 1e6).toFixed(1)} ms`;
    const respond = (resp: RpcResponse): RpcResponse | undefined => (hasId ? resp : undefined);

    const handler = this.methods.get(method);
    if (!handler) {
      this.log?.(`rpc ${method} -> error ${RpcErrorCode.METHOD_NOT_FOUND} method not found (${elapsed()})`);
      return respond(
        errorResponse(id, RpcErrorCode.METHOD_NOT_FOUND, `Method not found: ${method} (rpc_get_methods lists the methods)`),
      );
    }
    if (r.params !== undefined && (typeof r.params !== 'object' || r.params === null || Array.isArray(r.params))) {
      this.log?.(`rpc ${method} ${summary(r.params)} -> error ${RpcErrorCode.INVALID_PARAMS} (${elapsed()})`);
      return respond(
        errorResponse(id, RpcErrorCode.INVALID_PARAMS, 'Invalid parameters: "params" must be an object of named parameters'),
      );
    }
    const params = (r.params ?? {}) as RpcParams;
    try {
      const result = await handler(params);
      this.log?.(`rpc ${method} ${summary(params)} -> ${summary(result)} (${elapsed()})`);
      return respond({ jsonrpc: '2.0', id, result: result === undefined ? null : result });
    } catch (e) {
      const err =
        e instanceof RpcError
          ? e
          : new RpcError(RpcErrorCode.INTERNAL_ERROR, e instanceof Error ? e.message : String(e));
      this.log?.(`rpc ${method} ${summary(params)} -> error ${err.code} ${err.message} (${elapsed()})`);
      return respond(errorResponse(id, err.code, err.message, err.data));
    }
  }
}

/**
 * Makes `path` free for a new socket: nothing there is fine; a socket that something still
 * accepts connections on is refused (another server owns it); a stale socket (nobody
 * listening) is removed; anything that is not a socket is refused rather than deleted.
 */
export async function prepareSocketPath(path: string): Promise<void> {
  if (typeof path !== 'string' || path === '') throw new TypeError('path must be a non-empty string');
  let st;
  try {
    st = await lstat(path);
  } catch (e) {
    if ((e as NodeJS.ErrnoException).code === 'ENOENT') return;
    throw e;
  }
  if (!st.isSocket()) {
    throw new Error(`${path} exists and is not a socket: remove it or choose another path`);
  }
  const live = await new Promise<boolean>((resolve) => {
    const probe = connect(path);
    probe.once('connect', () => {
      probe.destroy();
      resolve(true);
    });
    probe.once('error', () => resolve(false));
  });
  if (live) {
    throw new Error(`${path} is in use: another server accepts connections on it (stop it or choose another path)`);
  }
  await unlink(path);
}
