// The JSON Schema of our own configuration format. It lives in code so that it ships in dist/
// (tsc copies no .json files) and can be handed to editors and validators from there;
// ts/config/schema.json is the same document for tools that want a file, and a test keeps the
// two identical.

export const CONFIG_SCHEMA_ID = 'https://virtio-initiator.dev/schema/config-1.json';

export const CONFIG_SCHEMA = {
  $schema: 'https://json-schema.org/draft/2020-12/schema',
  $id: CONFIG_SCHEMA_ID,
  title: 'virtio-initiator configuration',
  description: 'Controllers to attach at start-up: vhost-user sockets and virtio-scsi or virtio-blk PCI functions.',
  type: 'object',
  additionalProperties: false,
  required: ['controllers'],
  properties: {
    $schema: { type: 'string', description: 'The schema this file follows (ignored).' },
    controllers: {
      type: 'array',
      items: { $ref: '#/$defs/controller' },
    },
  },
  $defs: {
    controller: {
      type: 'object',
      additionalProperties: false,
      oneOf: [{ required: ['socket'] }, { required: ['pci'] }],
      properties: {
        name: {
          type: 'string',
          pattern: '^[A-Za-z0-9_.-]{1,64}$',
          description:
            'Controller name: the prefix of its devices, or for blk the name of its one disk (default VirtioScsi<n>, or VirtioBlk<n> for blk, with the lowest free n). With "pci": "all", the prefix of the functions\' names.',
        },
        socket: {
          type: 'string',
          minLength: 1,
          description: 'Path of a vhost-user socket; a relative path is taken from the working directory.',
        },
        pci: {
          type: 'string',
          pattern: '^(all|([0-9a-fA-F]{4}:)?[0-9a-fA-F]{2}:[0-9a-fA-F]{2}\\.[0-7])$',
          description:
            'A PCI function bound to vfio-pci (DDDD:BB:DD.F or BB:DD.F), or "all" for every such function of the controller\'s type.',
        },
        type: {
          enum: ['scsi', 'blk'],
          default: 'scsi',
          description: 'Device type: virtio-scsi (targets and LUNs, scanned) or virtio-blk (one disk, named after the controller).',
        },
        requestQueues: { type: 'integer', minimum: 1, maximum: 255, default: 1 },
        queueSize: {
          enum: [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024],
          default: 512,
          description: 'Ring entries per queue, a power of two.',
        },
        memoryBytes: { type: 'integer', minimum: 1, description: 'Size of the DMA memory pool (default 64 MiB).' },
        hugepages: { enum: ['auto', 'require', 'never'], default: 'auto' },
      },
    },
  },
} as const;

/** The schema as ts/config/schema.json holds it. */
export function schemaText(): string {
  return `${JSON.stringify(CONFIG_SCHEMA, null, 2)}\n`;
}
