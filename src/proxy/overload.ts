/**
 * Load shedding on event-loop delay (SPEC §14, `limits.maxEventLoopDelayMs`): a timer that
 * should fire every 100 ms measures how late it runs. While the loop is that far behind,
 * new requests get 503 `overloaded` at once instead of queueing behind work that is already late.
 */
const TICK_MS = 100

export class OverloadMonitor {
  maxDelayMs: number
  /** True while the last measured delay exceeds `maxDelayMs`. */
  shedding = false
  lastDelayMs = 0
  private timer: NodeJS.Timeout | null = null
  private expected = 0

  constructor (maxDelayMs: number) {
    this.maxDelayMs = maxDelayMs
  }

  start (): void {
    if (this.timer !== null) return
    this.expected = performance.now() + TICK_MS
    this.timer = setInterval(() => {
      const now = performance.now()
      this.lastDelayMs = Math.max(0, now - this.expected)
      this.expected = now + TICK_MS
      this.shedding = this.maxDelayMs > 0 && this.lastDelayMs > this.maxDelayMs
    }, TICK_MS)
    this.timer.unref()
  }

  stop (): void {
    if (this.timer !== null) clearInterval(this.timer)
    this.timer = null
    this.shedding = false
  }
}
