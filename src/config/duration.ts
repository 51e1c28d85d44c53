const UNIT_MS: Record<string, number> = { ms: 1, s: 1000, m: 60_000, h: 3_600_000 }
const DURATION = /^([0-9]+(?:\.[0-9]+)?)(ms|s|m|h)$/

/** A duration as the schema accepts it (`500ms`, `30s`, `5m`, `1h` or milliseconds) in milliseconds. */
export function toMs (value: number | string): number {
  if (typeof value === 'number') return value
  const m = DURATION.exec(value)
  if (m === null) throw new Error(`not a duration: ${value}`)
  return Math.round(Number(m[1]) * (UNIT_MS[m[2] as string] as number))
}
