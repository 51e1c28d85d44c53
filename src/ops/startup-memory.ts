/**
 * Start-up leaves garbage behind: the config parsed and validated, every module's code compiled
 * for its first run, the clients of the fleet, the flag provider and the exporter set up. V8
 * gives that memory back only when its memory reducer runs, 15–65 s after start on an idle
 * sidecar; until then a pod reads 7–9 MiB more than it holds (Node 24, every feature
 * configured; bench/README.md, 2026-12-06). One memory-reducing collection as soon as the
 * sidecar listens gives it back at once, for about 40 ms of the main thread, while no traffic
 * is routed to it yet: a load balancer routes only once `/ready` has answered, and a probe that
 * comes in those 40 ms waits for them.
 *
 * V8's `gc` is taken from a context made while its `--expose-gc` flag is on (the flag decides
 * only whether a new context gets `gc`) and the flag is turned off again at once; a process
 * started with `--expose-gc` has it already. Where the runtime offers neither, nothing is done.
 */
import { setFlagsFromString } from 'node:v8'
import { runInNewContext } from 'node:vm'

type GcFunction = (options?: { type?: 'major' | 'minor', execution?: 'sync' | 'async', flavor?: 'regular' | 'last-resort' }) => void

function exposedGc (): GcFunction | null {
  const own = (globalThis as { gc?: unknown }).gc
  if (typeof own === 'function') return own as GcFunction
  try {
    setFlagsFromString('--expose-gc')
    const gc: unknown = runInNewContext('gc')
    return typeof gc === 'function' ? gc as GcFunction : null
  } catch {
    return null
  } finally {
    setFlagsFromString('--no-expose-gc')
  }
}

/** V8 12 and later (Node 22 and later) take options; V8 11's `gc` with options misses garbage a plain call collects. */
const TAKES_OPTIONS = Number(process.versions.v8.split('.')[0]) >= 12

/**
 * Collect start-up's garbage now, memory first where V8 can (its "last resort" also shrinks
 * the young generation and returns the pages it pools). Its time in ms; null when V8's `gc`
 * is out of reach.
 */
export function releaseStartupGarbage (): number | null {
  const gc = exposedGc()
  if (gc === null) return null
  const t0 = performance.now()
  if (TAKES_OPTIONS) gc({ type: 'major', execution: 'sync', flavor: 'last-resort' })
  else gc()
  return performance.now() - t0
}
