// Load generation with autocannon (programmatic), keeping the float response
// time of every 2xx response so percentiles are exact rather than read from
// autocannon's 1 ms-resolution histogram.
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

/** Nearest-rank percentile of an ascending Float64Array (p in 0..100). */
export function percentile (sorted, p) {
  if (sorted.length === 0) return null
  const rank = Math.ceil((p / 100) * sorted.length)
  return sorted[Math.min(sorted.length - 1, Math.max(0, rank - 1))]
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
 */
export function runLoad ({ url, connections, duration, overallRate, during = [], onStart, onInstance }) {
  return new Promise((resolve, reject) => {
    const latencies = new FloatList()
    let responses = 0
    let non2xx = 0
    const timers = []
    onStart?.()
    const t0 = process.hrtime.bigint()
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
          mean: sorted.length ? sorted.reduce((a, b) => a + b, 0) / sorted.length : null
        })
      })
    } catch (err) {
      return reject(err)
    }
    instance.on('response', (client, statusCode, resBytes, responseTime) => {
      responses++
      if (statusCode >= 200 && statusCode < 300) latencies.push(responseTime)
      else non2xx++
    })
    onInstance?.(instance)
    for (const d of during) timers.push(setTimeout(d.fn, d.atSeconds * 1000))
  })
}
