// Splits a byte stream into JSON texts the way SPDK's RPC server reads its socket: there is no
// framing beyond JSON itself, so a request ends where its outermost object or array closes.
// Clients send pretty-printed, multi-line JSON, split across reads or several to a read; the
// splitter tracks strings, escapes and nesting depth over raw bytes (every structural character
// is ASCII and UTF-8 continuation bytes are >= 0x80, so multi-byte text never confuses it).

/** Thrown when the stream cannot be JSON (the connection has to end: nothing to resync on). */
export class StreamError extends Error {
  constructor(
    message: string,
    readonly kind: 'parse' | 'oversized',
  ) {
    super(message);
    this.name = 'StreamError';
  }
}

const OPEN_BRACE = 0x7b;
const CLOSE_BRACE = 0x7d;
const OPEN_BRACKET = 0x5b;
const CLOSE_BRACKET = 0x5d;
const QUOTE = 0x22;
const BACKSLASH = 0x5c;

function isWhitespace(b: number): boolean {
  return b === 0x20 || b === 0x0a || b === 0x0d || b === 0x09;
}

export class JsonSplitter {
  /** Bytes of the message being assembled (earlier chunks), when it spans reads. */
  private pending: Buffer[] = [];
  private pendingBytes = 0;
  private depth = 0;
  private inString = false;
  private escaped = false;

  /** @param maxBytes the largest message accepted; a longer one is an error, not a buffer that grows forever. */
  constructor(private readonly maxBytes: number) {}

  /** Feeds one read; returns the messages it completed, in order. */
  push(chunk: Buffer): string[] {
    const out: string[] = [];
    let start = this.depth === 0 ? -1 : 0;
    for (let i = 0; i < chunk.length; i++) {
      const b = chunk[i]!;
      if (this.depth === 0) {
        if (isWhitespace(b)) continue;
        if (b !== OPEN_BRACE && b !== OPEN_BRACKET) {
          throw new StreamError(
            `expected '{' or '[' to start a request, got ${JSON.stringify(String.fromCharCode(b))}`,
            'parse',
          );
        }
        start = i;
        this.depth = 1;
        continue;
      }
      if (this.inString) {
        if (this.escaped) this.escaped = false;
        else if (b === BACKSLASH) this.escaped = true;
        else if (b === QUOTE) this.inString = false;
        continue;
      }
      if (b === QUOTE) this.inString = true;
      else if (b === OPEN_BRACE || b === OPEN_BRACKET) this.depth++;
      else if (b === CLOSE_BRACE || b === CLOSE_BRACKET) {
        this.depth--;
        if (this.depth === 0) {
          const part = chunk.subarray(start, i + 1);
          this.checkSize(this.pendingBytes + part.length);
          this.pending.push(part);
          out.push(Buffer.concat(this.pending).toString('utf8'));
          this.pending = [];
          this.pendingBytes = 0;
          start = -1;
        }
      }
    }
    if (this.depth > 0 && start >= 0) {
      const part = chunk.subarray(start);
      this.checkSize(this.pendingBytes + part.length);
      // A copy: the caller's chunk may be reused once push returns.
      this.pending.push(Buffer.from(part));
      this.pendingBytes += part.length;
    }
    return out;
  }

  /** Bytes held of an unfinished message (0 between messages). */
  get buffered(): number {
    return this.pendingBytes;
  }

  private checkSize(bytes: number): void {
    if (bytes > this.maxBytes) {
      throw new StreamError(`request larger than ${this.maxBytes} bytes`, 'oversized');
    }
  }
}
