// SCSI command building, response parsing and sense decoding (design D5).

export * from './asc.js';
export * from './capacity.js';
export * from './cdb.js';
export * from './inquiry.js';
export * from './luns.js';
export * from './mode.js';
export * from './sense.js';
export { ScsiDataError, TruncatedDataError, type Lba } from './util.js';
