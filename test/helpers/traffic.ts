/**
 * Load for trigger and notification tests: bursts of requests through a real proxy listener
 * on one keep-alive pool, sustained traffic on a tick, and request latencies.
 */
import { Pool } from 'undici'
import { sleep } from './http.js'

export interface Traffic {
  pool: Pool
  /** `n` GETs of `path` at once; resolves to their statuses in order. */
  burst: (path: string, n: number) => Promise<number[]>
  /** One GET; resolves to its status and milliseconds to the full response. */
  timed: (path: string) => Promise<{ status: number, ms: number }>
  close: () => Promise<void>
}

export function traffic (base: string): Traffic {
  const pool = new Pool(base, { connections: 32, pipelining: 1 })
  const one = async (path: string): Promise<number> => {
    const res = await pool.request({ path, method: 'GET' })
    await res.body.dump()
    return res.statusCode
  }
  return {
    pool,
    burst: async (path, n) => await Promise.all(Array.from({ length: n }, async () => await one(path))),
    timed: async (path) => {
      const started = performance.now()
      const status = await one(path)
      return { status, ms: performance.now() - started }
    },
    close: async () => { await pool.destroy() }
  }
}

/**
 * Run `tick` every `everyMs` for `forMs` (each tick awaited, so ticks never pile up); resolves
 * to every status the ticks returned.
 */
export async function sustain (forMs: number, everyMs: number, tick: () => Promise<number[]>): Promise<number[]> {
  const statuses: number[] = []
  const until = Date.now() + forMs
  while (Date.now() < until) {
    const started = Date.now()
    statuses.push(...await tick())
    await sleep(Math.max(0, everyMs - (Date.now() - started)))
  }
  return statuses
}

export function median (values: number[]): number {
  const sorted = [...values].sort((a, b) => a - b)
  return sorted[Math.floor(sorted.length / 2)] ?? Number.NaN
}
