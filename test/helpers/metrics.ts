/**
 * Read Prometheus text from an ops listener: the value of one sample, matched by name and
 * by the labels given (other labels of the sample are ignored).
 */

export interface MetricSample {
  name: string
  labels: Record<string, string>
  value: number
}

/** Parse Prometheus text exposition into samples (comments skipped). */
export function parseMetrics (text: string): MetricSample[] {
  const out: MetricSample[] = []
  for (const line of text.split('\n')) {
    if (line === '' || line.startsWith('#')) continue
    const m = /^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?\s+(\S+)/.exec(line)
    if (m === null) continue
    const labels: Record<string, string> = {}
    const body = m[2] ?? ''
    for (const l of body.matchAll(/([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"/g)) labels[l[1] as string] = (l[2] as string).replace(/\\(.)/g, '$1')
    out.push({ name: m[1] as string, labels, value: Number(m[3]) })
  }
  return out
}

/** Fetch `${ops}/metrics` and parse it. */
export async function scrape (ops: string): Promise<MetricSample[]> {
  const res = await fetch(`${ops}/metrics`)
  return parseMetrics(await res.text())
}

/**
 * Sum of the samples called `name` whose labels include `labels` (0 when there is none).
 * Summing lets a caller leave out a label (`code`) and count across its values.
 */
export async function metricValue (ops: string, name: string, labels: Record<string, string> = {}): Promise<number> {
  return sumOf(await scrape(ops), name, labels)
}

export function sumOf (samples: MetricSample[], name: string, labels: Record<string, string> = {}): number {
  let total = 0
  for (const s of samples) {
    if (s.name !== name) continue
    if (Object.entries(labels).every(([k, v]) => s.labels[k] === v)) total += s.value
  }
  return total
}

/** True when a sample called `name` with exactly these label values (and maybe more) exists. */
export function hasSample (samples: MetricSample[], name: string, labels: Record<string, string> = {}): boolean {
  return samples.some((s) => s.name === name && Object.entries(labels).every(([k, v]) => s.labels[k] === v))
}
