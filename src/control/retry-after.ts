/**
 * When to try a notification again. A receiver that rate-limits (Slack, Statuspage, a webhook
 * behind a gateway) says how long to wait in `Retry-After` (RFC 9110 §10.2.3) on its 429 or
 * 503: retrying sooner only earns another 429, and `maxAttempts` would be spent in seconds and
 * the message lost while the receiver had asked for half a minute.
 */

/** The longest `Retry-After` honoured: a receiver asking for more is tried again after this. */
export const MAX_RETRY_AFTER_MS = 300_000

/**
 * `Retry-After` as milliseconds from `nowMs`: delta-seconds or an HTTP-date; null when absent
 * or not understood. Capped at `MAX_RETRY_AFTER_MS`.
 */
export function retryAfterMs (header: string | string[] | undefined, nowMs: number): number | null {
  const value = (Array.isArray(header) ? header[0] : header)?.trim()
  if (value === undefined || value === '') return null
  let ms: number
  if (/^\d+$/.test(value)) ms = Number(value) * 1000
  else {
    const at = Date.parse(value)
    if (Number.isNaN(at)) return null
    ms = at - nowMs
  }
  return Math.min(MAX_RETRY_AFTER_MS, Math.max(0, ms))
}

/**
 * The pause before retry `attempt` + 1: exponential from 500 ms, capped at 30 s, with jitter;
 * never shorter than what the receiver asked for.
 */
export function retryDelayMs (attempt: number, asked: number | null): number {
  const backoff = Math.min(30_000, 500 * 2 ** (attempt - 1)) * (0.75 + Math.random() * 0.5)
  return Math.max(backoff, asked ?? 0)
}
