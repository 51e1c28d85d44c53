/**
 * Retry budget (Linkerd's `retryRatio` / `minRetriesPerSecond` over a 10 s window; Envoy's
 * `budget_percent` is the same idea): retries may add at most `budgetPercent` of the route's
 * requests, plus a small floor so a quiet route can still retry. Retries that would exceed it
 * are not made — a retry storm against an upstream that is already failing is how a partial
 * outage becomes a total one.
 *
 * Its seconds are `performance.now()`'s: a wall clock stepped back (NTP, a VM restore) would
 * leave the last ten seconds' counts in place for as long as the step.
 */
const BUCKETS = 10

export class RetryBudget {
  private readonly ratio: number
  private readonly floor: number
  private readonly requests = new Float64Array(BUCKETS)
  private readonly retries = new Float64Array(BUCKETS)
  private second = 0
  exhausted = 0
  retried = 0

  constructor (budgetPercent: number, minRetriesPerSecond: number) {
    this.ratio = budgetPercent / 100
    this.floor = minRetriesPerSecond * BUCKETS
  }

  private rotate (nowMs: number): number {
    const second = Math.floor(nowMs / 1000)
    if (second !== this.second) {
      const gap = Math.min(second - this.second, BUCKETS)
      for (let i = 1; i <= gap; i++) {
        const b = (this.second + i) % BUCKETS
        this.requests[b] = 0
        this.retries[b] = 0
      }
      this.second = second
    }
    return second % BUCKETS
  }

  /** Count one original request. */
  request (nowMs: number): void {
    this.requests[this.rotate(nowMs)]++
  }

  /** Take one retry from the budget; false when it is spent. */
  tryRetry (nowMs: number): boolean {
    const b = this.rotate(nowMs)
    let requests = 0; let retries = 0
    for (let i = 0; i < BUCKETS; i++) { requests += this.requests[i] as number; retries += this.retries[i] as number }
    if (retries + 1 > requests * this.ratio + this.floor) {
      this.exhausted++
      return false
    }
    this.retries[b]++
    this.retried++
    return true
  }
}
