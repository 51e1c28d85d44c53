/**
 * Durations: `500ms`, `30s`, `5m`, `1h`, or a number of milliseconds. Every duration ends up in
 * a Node.js timer (or undici's, which are Node's), and Node cannot wait longer than 2^31 − 1 ms:
 * a larger delay silently becomes 1 ms, so `timeoutMs: 1e308` would time out at once. A
 * duration is therefore a whole number of milliseconds from 0 to `MAX_DURATION_MS`.
 */
import type { TSchema } from '@sinclair/typebox'
import { walk } from './schema-walk.js'

const UNIT_MS: Record<string, number> = { ms: 1, s: 1000, m: 60_000, h: 3_600_000 }
const DURATION = /^([0-9]+(?:\.[0-9]+)?)(ms|s|m|h)$/

/** The longest duration: the longest delay a Node.js timer accepts (about 24.8 days). */
export const MAX_DURATION_MS = 2 ** 31 - 1

/** Marks the schema of a duration, so a walk over the schema can find every one. */
export const DURATION_KIND: unique symbol = Symbol('breakwater.duration')

/** A duration as the schema accepts it (`500ms`, `30s`, `5m`, `1h` or milliseconds) in milliseconds. */
export function toMs (value: number | string): number {
  if (typeof value === 'number') return value
  const m = DURATION.exec(value)
  if (m === null) throw new Error(`not a duration: ${value}`)
  return Math.round(Number(m[1]) * (UNIT_MS[m[2] as string] as number))
}

/**
 * A duration of a config being built, in milliseconds: 0 for one the schema has already
 * reported as malformed, so that building goes on and one run lists every problem.
 */
export function durationMs (value: number | string): number {
  try {
    return toMs(value)
  } catch {
    return 0
  }
}

/** The problem with a duration the schema accepted (too long), or null. */
export function durationProblem (at: string, value: number | string): string | null {
  if (typeof value === 'number' && !Number.isFinite(value)) return `${at}: must be a finite number of milliseconds (got ${String(value)})`
  let ms: number
  try {
    ms = toMs(value)
  } catch {
    return null // malformed: the schema reports it
  }
  if (ms <= MAX_DURATION_MS) return null
  return `${at}: must be at most ${MAX_DURATION_MS} ms (about 24.8 days, the longest timer Node.js can set) (got ${typeof value === 'number' ? String(value) : JSON.stringify(value)})`
}

/**
 * Every duration in `value` (found beside its schema) that is too long for a timer: a string
 * such as `9999999h`. A number that large is already a schema error, worded the same way.
 */
export function durationProblems (schema: TSchema, value: unknown): string[] {
  const problems: string[] = []
  walk(schema, value, '', (s, v, at) => {
    if ((s as unknown as Record<symbol, unknown>)[DURATION_KIND] === true && typeof v === 'string') {
      const problem = durationProblem(at, v)
      if (problem !== null) problems.push(problem)
    }
    return v
  })
  return problems
}
