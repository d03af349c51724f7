// A JSON reader that keeps positions. JSON.parse in Node 20 does not say where a syntax error
// is, and a semantic error ("vq_size must be a power of two") is more useful with the line of
// the value; so the text is parsed here, recording the line of every value by its JSON path.

import { ConfigError, type Where } from './types.js';

export type JsonValue = null | boolean | number | string | JsonValue[] | { [key: string]: JsonValue };
export type JsonObject = { [key: string]: JsonValue };

export interface JsonDocument {
  value: JsonValue;
  /** Line and column (1-based) of the value at each JSON path ('' is the root). */
  positions: Map<string, { line: number; column: number }>;
}

/** `a.b[2].c`, with keys that are not identifiers written as `["odd key"]`. */
export function childPath(parent: string, key: string | number): string {
  if (typeof key === 'number') return `${parent}[${key}]`;
  if (/^[A-Za-z_$][\w$]*$/.test(key)) return parent === '' ? key : `${parent}.${key}`;
  return `${parent}[${JSON.stringify(key)}]`;
}

/** Where a JSON path is: the file, its line and column when known, and the path. */
export function whereIn(doc: JsonDocument | undefined, source: string, path: string): Where {
  const pos = doc?.positions.get(path);
  const where: Where = { source, path };
  if (pos) {
    where.line = pos.line;
    where.column = pos.column;
  }
  return where;
}

export function isObject(v: JsonValue | undefined): v is JsonObject {
  return typeof v === 'object' && v !== null && !Array.isArray(v);
}

export function parseJson(text: string, source: string): JsonDocument {
  return new Reader(text, source).document();
}

class Reader {
  private pos = 0;
  private readonly positions = new Map<string, { line: number; column: number }>();

  constructor(
    private readonly text: string,
    private readonly source: string,
  ) {}

  document(): JsonDocument {
    this.space();
    const value = this.value('');
    this.space();
    if (this.pos < this.text.length) this.error('unexpected text after the JSON value');
    return { value, positions: this.positions };
  }

  private lineColumn(at: number): { line: number; column: number } {
    let line = 1;
    let start = 0;
    for (let i = 0; i < at && i < this.text.length; i++) {
      if (this.text.charCodeAt(i) === 10) {
        line++;
        start = i + 1;
      }
    }
    return { line, column: at - start + 1 };
  }

  private error(detail: string, at = this.pos): never {
    const { line, column } = this.lineColumn(at);
    throw new ConfigError({ source: this.source, line, column }, `invalid JSON: ${detail}`);
  }

  private found(): string {
    return this.pos >= this.text.length ? 'the end of the file' : JSON.stringify(this.text[this.pos]);
  }

  private space(): void {
    while (this.pos < this.text.length && ' \t\n\r'.includes(this.text[this.pos] as string)) this.pos++;
  }

  private value(path: string): JsonValue {
    this.positions.set(path, this.lineColumn(this.pos));
    const c = this.text[this.pos];
    if (c === '{') return this.object(path);
    if (c === '[') return this.array(path);
    if (c === '"') return this.string();
    if (c === '-' || (c !== undefined && c >= '0' && c <= '9')) return this.number();
    for (const [word, v] of [
      ['true', true],
      ['false', false],
      ['null', null],
    ] as const) {
      if (this.text.startsWith(word, this.pos)) {
        this.pos += word.length;
        return v;
      }
    }
    return this.error(`expected a value, found ${this.found()}`);
  }

  private object(path: string): JsonObject {
    const out: JsonObject = {};
    this.pos++;
    this.space();
    if (this.text[this.pos] === '}') {
      this.pos++;
      return out;
    }
    for (;;) {
      this.space();
      if (this.text[this.pos] !== '"') this.error(`expected a double-quoted property name, found ${this.found()}`);
      const key = this.string();
      this.space();
      if (this.text[this.pos] !== ':') this.error(`expected ':' after property name ${JSON.stringify(key)}, found ${this.found()}`);
      this.pos++;
      this.space();
      // Assigned with defineProperty so that a "__proto__" key is data, as JSON.parse makes it.
      Object.defineProperty(out, key, { value: this.value(childPath(path, key)), enumerable: true, writable: true, configurable: true });
      this.space();
      const c = this.text[this.pos];
      this.pos++;
      if (c === '}') return out;
      if (c !== ',') this.error(`expected ',' or '}' after a property value, found ${c === undefined ? 'the end of the file' : JSON.stringify(c)}`, this.pos - 1);
    }
  }

  private array(path: string): JsonValue[] {
    const out: JsonValue[] = [];
    this.pos++;
    this.space();
    if (this.text[this.pos] === ']') {
      this.pos++;
      return out;
    }
    for (;;) {
      this.space();
      out.push(this.value(childPath(path, out.length)));
      this.space();
      const c = this.text[this.pos];
      this.pos++;
      if (c === ']') return out;
      if (c !== ',') this.error(`expected ',' or ']' after an array element, found ${c === undefined ? 'the end of the file' : JSON.stringify(c)}`, this.pos - 1);
    }
  }

  private string(): string {
    const start = this.pos;
    this.pos++;
    for (;;) {
      const c = this.text[this.pos];
      if (c === undefined) this.error('unterminated string', start);
      if (c === '"') break;
      if (c === '\\') this.pos++;
      else if (c < ' ') this.error('control character in a string (escape it)');
      this.pos++;
    }
    this.pos++;
    try {
      // The escapes are JSON's own; JSON.parse decodes them and rejects bad ones.
      return JSON.parse(this.text.slice(start, this.pos)) as string;
    } catch {
      return this.error('bad escape in a string', start);
    }
  }

  private number(): number {
    const m = /^-?(?:0|[1-9]\d*)(?:\.\d+)?(?:[eE][+-]?\d+)?/.exec(this.text.slice(this.pos));
    if (!m) return this.error(`bad number, found ${this.found()}`);
    this.pos += m[0].length;
    return Number(m[0]);
  }
}
