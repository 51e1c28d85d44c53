// Load generation with autocannon (programmatic), keeping the float response
// time of every 2xx response so percentiles are exact rather than read from
// autocannon's 1 ms-resolution histogram.
import { monitorEventLoopDelay } from 'node:perf_hooks'
import autocannon from 'autocannon'

class FloatList {
  constructor (capacity = 1 << 16) {
    this.buf = new Float64Array(capacity)
    this.length = 0
  }

  push (v) {
    if (this.length === this.buf.length) {
      const next = new Float64Array(this.buf.length * 2)
      next.set(this.buf)
      this.buf = next
    }
    this.buf[this.length++] = v
  }

  sorted () {
    return this.buf.slice(0, this.length).sort()
  }
}

/**
 * The connection ramp of a closed loop: autocannon opens every connection at once, and the
 * requests sent on them wait until the target has accepted their connection. The ramp ends
 * when every connection has had a response; the tail after it is the steady state's.
 */
class Ramp {
  constructor (connections) {
    this.connections = connections
    this.seen = new Set()
    this.t0 = performance.now()
    this.endMs = null
    this.after = new FloatList()
  }

  response (client, responseTime) {
    const now = performance.now() - this.t0
    if (this.endMs === null) {
      this.seen.add(client)
      if (this.seen.size === this.connections) this.endMs = now
    } else if (now - responseTime >= this.endMs) {
      this.after.push(responseTime)
    }
  }

  summary () {
    const sorted = this.after.sorted()
    return {
      rampS: this.endMs === null ? null : this.endMs / 1000,
      afterRamp: {
        ok2xx: sorted.length,
        p99: percentile(sorted, 99),
        p999: percentile(sorted, 99.9),
        max: sorted.length ? sorted[sorted.length - 1] : null,
        over1s: sorted.length - countAtMost(sorted, SLOW_MS)
      }
    }
  }
}

/** Nearest-rank percentile of an ascending Float64Array (p in 0..100). */
export function percentile (sorted, p) {
  if (sorted.length === 0) return null
  const rank = Math.ceil((p / 100) * sorted.length)
  return sorted[Math.min(sorted.length - 1, Math.max(0, rank - 1))]
}

/** Responses slower than this count as stalls (the `c200` scenario's "over 1 s"). */
export const SLOW_MS = 1000

/** How many values of an ascending Float64Array are <= limit (binary search). */
function countAtMost (sorted, limit) {
  let lo = 0
  let hi = sorted.length
  while (lo < hi) {
    const mid = (lo + hi) >> 1
    if (sorted[mid] <= limit) lo = mid + 1
    else hi = mid
  }
  return lo
}

/**
 * Run autocannon once.
 * @param {object} o
 * @param {string} o.url
 * @param {number} o.connections
 * @param {number} o.duration seconds
 * @param {number} [o.overallRate] requests/s over all connections
 * @param {Array<{atSeconds:number, fn:Function}>} [o.during] callbacks to run while the load is on
 * @param {Function} [o.onStart] called right before load starts (for CPU snapshots)
 * @param {Function} [o.onInstance] receives the autocannon instance (to stop() it early)
 * @param {boolean} [o.tail] also report the tail after the connection ramp (see `afterRamp`)
 *   and the load generator's own event-loop delay
 */
export function runLoad ({ url, connections, duration, overallRate, during = [], onStart, onInstance, tail = false }) {
  return new Promise((resolve, reject) => {
    const latencies = new FloatList()
    const ramp = tail ? new Ramp(connections) : null
    const loopDelay = tail ? monitorEventLoopDelay({ resolution: 10 }) : null
    let responses = 0
    let non2xx = 0
    const timers = []
    onStart?.()
    const t0 = process.hrtime.bigint()
    loopDelay?.enable()
    const opts = {
      url,
      connections,
      pipelining: 1,
      duration,
      timeout: 10
    }
    if (overallRate) opts.overallRate = overallRate
    let instance
    try {
      instance = autocannon(opts, (err, result) => {
        const elapsedS = Number(process.hrtime.bigint() - t0) / 1e9
        for (const t of timers) clearTimeout(t)
        loopDelay?.disable()
        if (err) return reject(err)
        const sorted = latencies.sorted()
        resolve({
          responses,
          ok2xx: sorted.length,
          non2xx,
          errors: result.errors,
          timeouts: result.timeouts,
          resets: result.resets ?? 0,
          elapsedS,
          reqPerSec: responses / elapsedS,
          p50: percentile(sorted, 50),
          p90: percentile(sorted, 90),
          p99: percentile(sorted, 99),
          p999: percentile(sorted, 99.9),
          max: sorted.length ? sorted[sorted.length - 1] : null,
          over1s: sorted.length - countAtMost(sorted, SLOW_MS),
          mean: sorted.length ? sorted.reduce((a, b) => a + b, 0) / sorted.length : null,
          ...(ramp === null ? {} : ramp.summary()),
          ...(loopDelay === null ? {} : { loadgenDelayP99: loopDelay.percentile(99) / 1e6, loadgenDelayMax: loopDelay.max / 1e6 })
        })
      })
    } catch (err) {
      return reject(err)
    }
    instance.on('response', (client, statusCode, resBytes, responseTime) => {
      responses++
      if (statusCode >= 200 && statusCode < 300) {
        latencies.push(responseTime)
        ramp?.response(client, responseTime)
      } else non2xx++
    })
    onInstance?.(instance)
    for (const d of during) timers.push(setTimeout(d.fn, d.atSeconds * 1000))
  })
}
