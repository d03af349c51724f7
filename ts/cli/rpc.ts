// `virtio-initiator rpc --listen PATH [--config FILE]`: the management server (JSON-RPC 2.0 with
// SPDK's method names), attaching what the configuration names at start. One log line per call;
// SIGINT or SIGTERM detach everything and remove the socket.

import { expandPciAll, loadConfig } from '../config/index.js';
import { type LogLevel, setLogLevel } from '../log.js';
import { startRpcServer } from '../rpc/index.js';
import { bad, HELP_OPTION, LOG_LEVEL_OPTION, logLevelOf, type OptionSpec, optionsHelp, parseArgs, type Subcommand, UsageError } from './args.js';

const OPTIONS: readonly OptionSpec[] = [
  { name: 'listen', kind: 'value', metavar: 'PATH', help: 'unix socket to serve on (a stale one is replaced, a live one is an error)' },
  { name: 'config', kind: 'value', metavar: 'FILE', help: 'controllers to attach at start (SPDK INI or JSON, or ours)' },
  { name: 'mode', kind: 'value', metavar: 'OCTAL', help: 'file mode of the socket (default 600: its owner only)' },
  LOG_LEVEL_OPTION,
  HELP_OPTION,
];

const HELP = `usage: virtio-initiator rpc --listen PATH [--config FILE] [options]

Serves JSON-RPC 2.0 on a unix socket with SPDK's method names and parameters
(bdev_virtio_attach_controller, bdev_virtio_detach_controller, bdev_virtio_scsi_get_devices,
bdev_get_bdevs, bdev_get_iostat, rpc_get_methods, spdk_get_version), so that SPDK's own client
drives it: spdk-rpc -s PATH bdev_virtio_attach_controller -t user -a /run/vhost.sock -d scsi Virtio0
(-d blk for a virtio-blk target: one bdev, named like the controller)

options:
${optionsHelp(OPTIONS)}
`;

interface RpcConfig {
  listen: string;
  config: string | undefined;
  mode: number | undefined;
  logLevel: LogLevel | undefined;
}

export function parseRpcArgs(argv: readonly string[]): RpcConfig | 'help' {
  const a = parseArgs(argv, OPTIONS);
  if (a.flag('help')) return 'help';
  const listen = a.string('listen');
  if (listen === undefined || listen === '') throw new UsageError('give the socket to serve on: --listen PATH');
  const modeText = a.string('mode');
  let mode: number | undefined;
  if (modeText !== undefined) {
    if (!/^0?[0-7]{3}$/.test(modeText)) throw bad('mode', modeText, 'an octal file mode like 600 or 660');
    mode = parseInt(modeText, 8);
  }
  return { listen, config: a.string('config'), mode, logLevel: logLevelOf(a) };
}

const log = (line: string): void => {
  process.stderr.write(`virtio-initiator rpc: ${line}\n`);
};

export const rpc: Subcommand = {
  async run(argv: string[]): Promise<number> {
    const cfg = parseRpcArgs(argv);
    if (cfg === 'help') {
      process.stdout.write(HELP);
      return 0;
    }
    if (cfg.logLevel !== undefined) setLogLevel(cfg.logLevel);
    // Read before the socket exists: a broken file starts nothing.
    const config = cfg.config !== undefined ? await loadConfig(cfg.config) : undefined;
    for (const w of config?.warnings ?? []) log(`${cfg.config}: ${w}`);
    const server = await startRpcServer({ path: cfg.listen, ...(cfg.mode !== undefined ? { mode: cfg.mode } : {}), log });
    const stopped = new Promise<NodeJS.Signals>((resolve) => {
      process.once('SIGINT', resolve);
      process.once('SIGTERM', resolve);
    });
    try {
      for (const c of expandPciAll(config?.controllers ?? [], undefined, (w) => log(w))) {
        const transport = c.transport;
        if (transport.type === 'pci-all') continue; // expanded above
        const bdevs = await server.attach({
          name: c.name,
          trtype: transport.type === 'vhost-user' ? 'user' : 'pci',
          traddr: transport.type === 'vhost-user' ? transport.path : transport.address,
          dev_type: c.deviceType,
          vq_count: c.requestQueues,
          vq_size: c.queueSize,
        });
        log(`attached ${c.name}: ${bdevs.join(', ') || 'no block devices'}`);
      }
      log(`listening on ${server.path}`);
      const signal = await stopped;
      log(`${signal}: detaching ${server.controllers.size} controller(s)`);
      return 0;
    } finally {
      await server.close();
    }
  },
};
