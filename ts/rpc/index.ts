// Management RPC (design D9): a JSON-RPC 2.0 server on a unix socket with SPDK's method names,
// parameters and wire behaviour, attaching and detaching virtio-scsi and virtio-blk controllers.

import type { ControllerOptions } from '../controller.js';
import { type AttachedController, VirtioRpcMethods } from './methods.js';
import { JsonRpcServer } from './server.js';

export { type AttachedController, uuidOf, VirtioRpcMethods } from './methods.js';
export {
  DEFAULT_MAX_REQUEST_BYTES,
  Errno,
  JsonRpcServer,
  prepareSocketPath,
  RpcError,
  RpcErrorCode,
  type RpcHandler,
  type RpcParams,
  type RpcServerOptions,
} from './server.js';
export { JsonSplitter, StreamError } from './splitter.js';

export interface StartRpcServerOptions {
  /** Socket path. An existing live socket there is an error, a stale one is replaced. */
  path: string;
  /** File mode of the socket (default 0o600). */
  mode?: number;
  /** One line per call (method, parameters, result or error, duration). */
  log?: (line: string) => void;
  /** Largest request in bytes (default 1 MiB); a larger one gets -32700 and the connection ends. */
  maxRequestBytes?: number;
  /** Options every attached controller gets (e.g. memoryBytes). */
  controllerOptions?: Omit<ControllerOptions, 'name' | 'type' | 'requestQueues' | 'queueSize'>;
}

export interface RpcServer extends AsyncDisposable {
  readonly path: string;
  /** Controllers attached through the socket (or `attach`), by name. */
  readonly controllers: ReadonlyMap<string, AttachedController>;
  /**
   * Attaches a controller as `bdev_virtio_attach_controller` with these (SPDK) parameters would,
   * e.g. those of a configuration file at start; resolves with its bdev names.
   */
  attach(params: { name: string; trtype: 'user' | 'pci'; traddr: string; dev_type?: 'scsi' | 'blk'; vq_count?: number; vq_size?: number }): Promise<string[]>;
  /** Stops the server, detaches every controller it attached and removes its socket. */
  close(): Promise<void>;
}

export async function startRpcServer(options: StartRpcServerOptions): Promise<RpcServer> {
  const methods = new VirtioRpcMethods({
    ...(options.controllerOptions ? { controllerOptions: options.controllerOptions } : {}),
    ...(options.log ? { log: options.log } : {}),
  });
  const server = await JsonRpcServer.listen({
    path: options.path,
    ...(options.mode !== undefined ? { mode: options.mode } : {}),
    ...(options.log ? { log: options.log } : {}),
    ...(options.maxRequestBytes !== undefined ? { maxRequestBytes: options.maxRequestBytes } : {}),
  });
  for (const [name, handler] of Object.entries(methods.handlers(() => server.methodNames))) {
    server.register(name, handler);
  }
  let closing: Promise<void> | undefined;
  const close = (): Promise<void> => {
    closing ??= (async () => {
      // Stop taking requests first, so that nothing attaches behind closeAll's back.
      await server.close();
      await methods.closeAll();
    })();
    return closing;
  };
  return {
    path: server.path,
    controllers: methods.controllers,
    attach: (params) => methods.attach({ ...params }),
    close,
    [Symbol.asyncDispose]: close,
  };
}
