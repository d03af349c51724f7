// Runs the parser properties of __test__/helpers/parser-properties.ts at a chosen count:
//   node --import tsx scripts/fuzz-parsers.ts --count N [--seed S] [--parser NAME]...
// Prints one line per parser and exits 1 when any property fails, after its counterexample.
// A negative seed, as fast-check reports them, is passed as --seed=-123.

import { parseArgs } from 'node:util';

import { PARSER_SUITES, parseSeed, runsFor } from '../__test__/helpers/parser-properties.js';

const { values } = parseArgs({
  options: {
    count: { type: 'string', default: '10000' },
    seed: { type: 'string' },
    parser: { type: 'string', multiple: true },
  },
  strict: true,
});

const count = Number(values.count);
if (!Number.isSafeInteger(count) || count < 1) {
  throw new Error(`--count must be a positive integer, got ${values.count}`);
}
const seed = parseSeed(values.seed);
const only = values.parser ?? [];
const unknown = only.filter((name) => !PARSER_SUITES.some((s) => s.parser === name));
if (unknown.length > 0) {
  throw new Error(`unknown parser ${unknown.join(', ')}; known: ${PARSER_SUITES.map((s) => s.parser).join(', ')}`);
}

/** fast-check's report (seed, path, counterexample) and the error behind it. */
function describe(e: unknown): string {
  if (!(e instanceof Error)) return String(e);
  return e.cause === undefined ? e.message : `${e.message}\nCaused by: ${describe(e.cause)}`;
}

let failed = 0;
const started = performance.now();
for (const { parser, properties } of PARSER_SUITES) {
  if (only.length > 0 && !only.includes(parser)) continue;
  const t0 = performance.now();
  let failures = 0;
  for (const p of properties) {
    try {
      p.run(seed === undefined ? { numRuns: count } : { numRuns: count, seed });
    } catch (e) {
      failures++;
      console.error(`${parser}: ${p.name} FAILED\n${describe(e)}\n`);
    }
  }
  const seconds = (performance.now() - t0) / 1000;
  const runs = properties.reduce((n, p) => n + runsFor(p, count), 0);
  console.log(
    `${parser.padEnd(34)} properties=${properties.length} runs=${runs} seconds=${seconds.toFixed(1)} ` +
      `rate=${Math.round(runs / seconds)}/s failures=${failures}`,
  );
  failed += failures;
}
console.log(`total seconds=${((performance.now() - started) / 1000).toFixed(1)} failures=${failed}`);
process.exitCode = failed > 0 ? 1 : 0;
