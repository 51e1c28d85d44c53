/**
 * SPEC §14's `routes[].idleTimeoutMs` for every exchange in flight, and its `routes[].timeoutMs`
 * (request fully sent → response head), kept by one sweep rather than a timer per request.
 *
 * A socket timer (`socket.setTimeout`) is exact, but a request pays for it several times over:
 * arming it, disarming it when the response ends, and moving it on every read and every write
 * (each move reads libuv's clock). The bound is a limit on silence, so it need not be exact:
 * the sweep compares each watched client socket's byte counts with what the last sweep saw,
 * and a socket whose counts have not moved for the route's `idleTimeoutMs` is silent (the
 * exchange tells whose silence it is: a client that stops sending or reading, or an upstream
 * that stops sending a response body with nothing left to write to the client). A byte
 * either way is noticed at the next sweep, so a client is never cut sooner than
 * `idleTimeoutMs` after its last byte, and at most two sweep intervals later (a tenth of the
 * shortest watched `idleTimeoutMs` each, between 10 ms and 1 s). The watched exchanges are a
 * list threaded through them (a Set would give every request's object an identity hash, which
 * costs more than the timer it replaces): watching costs a request four field writes.
 *
 * A pass that runs late (the event loop stalled: a long collection, a throttled CPU) judges
 * silence at the time it was due, not the time it ran. Bytes that came meanwhile wait unread in
 * the kernel until the loop polls again, so judged at the time it ran, a client that kept
 * sending would be blamed for the sidecar's own stall; the next pass, after the poll, sees
 * them. A stall does not put a silent client's cut off by more than the stall itself.
 *
 * The head's deadline is an instant (the exchange notes it when undici has sent the request:
 * one clock read), checked on the same pass and judged the same way: a head that came during
 * a stall of the sidecar's own is read before the next pass, not timed out. It fires at most
 * one sweep interval late, a tenth of the route's `timeoutMs` (undici's own `headersTimeout`,
 * left on behind it, ticks in half-seconds: a 200 ms timeout fired after a whole second).
 */
import type { Socket } from 'node:net'

/** What the sweep reads of a watched exchange and tells it. */
export interface Silent {
  readonly clientSocket: Socket
  /** This exchange's bound on silence (its route's `idleTimeoutMs`). */
  readonly silenceLimitMs: number
  /** Its bound on the wait for the response head (its route's `timeoutMs`; 0: none). */
  readonly headLimitMs: number
  /** When the response head is due (`performance.now()`), 0 while none is awaited. */
  headDueAt: number
  /** The head is overdue: false once it is ended (no longer watched), true to go on watching. */
  onHeadOverdue: () => boolean
  /** The sweep's notes: byte counts last seen (-1 before the first sweep) and since when. */
  seenRead: number
  seenWritten: number
  quietSince: number
  /** Silent past its limit: false once it is cut (no longer watched), true to go on watching. */
  onSilent: () => boolean
  /** The list's links (null, null when not watched and when alone). */
  silencePrev: Silent | null
  silenceNext: Silent | null
}

const MIN_SWEEP_MS = 10
const MAX_SWEEP_MS = 1000

export class SilenceWatch {
  /** The first exchange of the list. */
  private first: Silent | null = null
  private count = 0
  private timer: NodeJS.Timeout | null = null
  private everyMs = MAX_SWEEP_MS
  /** When the timer last ran a pass (or was started). */
  private lastTickAt = 0

  get size (): number {
    return this.count
  }

  /** Watch `ex` until `unwatch` (once: an exchange watched already must not be watched again). */
  watch (ex: Silent): void {
    ex.seenRead = -1
    ex.seenWritten = -1
    const first = this.first
    ex.silencePrev = null
    ex.silenceNext = first
    if (first !== null) first.silencePrev = ex
    this.first = ex
    this.count++
    const every = everyFor(ex)
    if (this.timer !== null && every >= this.everyMs) return
    this.arm(every)
  }

  private arm (every: number): void {
    if (this.timer !== null) clearInterval(this.timer)
    this.everyMs = every
    this.lastTickAt = performance.now()
    this.timer = setInterval(tick, every, this).unref()
  }

  /** Stop watching `ex`; nothing when it is not watched. */
  unwatch (ex: Silent): void {
    const prev = ex.silencePrev
    const next = ex.silenceNext
    if (prev === null && this.first !== ex) return
    if (prev === null) this.first = next
    else prev.silenceNext = next
    if (next !== null) next.silencePrev = prev
    ex.silencePrev = null
    ex.silenceNext = null
    this.count--
  }

  /** The timer's pass at `now`: a sweep judged at the time it was due (above). */
  tick (now: number): void {
    const due = this.lastTickAt + this.everyMs
    this.lastTickAt = now
    this.sweep(now, Math.min(now, due))
    // Quicker than the default: only while an exchange that needs it is still watched (one
    // request on a route with a short timeoutMs must not keep every pass quick for good).
    if (this.timer === null || this.everyMs >= MAX_SWEEP_MS) return
    let every = MAX_SWEEP_MS
    for (let ex = this.first; ex !== null && every > this.everyMs; ex = ex.silenceNext) every = Math.min(every, everyFor(ex))
    if (every > this.everyMs) this.arm(every)
  }

  /**
   * One pass at `now`: tell whose head was overdue at `judgedAt`, note who moved a byte, tell who
   * had been silent too long at `judgedAt`.
   */
  sweep (now: number, judgedAt = now): void {
    if (this.first === null) { this.stop(); return }
    let ex: Silent | null = this.first
    while (ex !== null) {
      const after: Silent | null = ex.silenceNext
      const due = ex.headDueAt
      if (due !== 0 && judgedAt >= due && !ex.onHeadOverdue()) {
        this.unwatch(ex)
        ex = after
        continue
      }
      const socket = ex.clientSocket
      const read = socket.bytesRead
      const written = socket.bytesWritten
      if (read !== ex.seenRead || written !== ex.seenWritten) {
        ex.seenRead = read
        ex.seenWritten = written
        ex.quietSince = now
      } else if (judgedAt - ex.quietSince >= ex.silenceLimitMs && !ex.onSilent()) {
        this.unwatch(ex)
      }
      ex = after
    }
  }

  stop (): void {
    if (this.timer === null) return
    clearInterval(this.timer)
    this.timer = null
    this.everyMs = MAX_SWEEP_MS
  }
}

/** The pass interval `ex` needs: a tenth of its shortest limit, 10 ms to 1 s. */
function everyFor (ex: Silent): number {
  const headLimit = ex.headLimitMs
  const limit = headLimit > 0 && headLimit < ex.silenceLimitMs ? headLimit : ex.silenceLimitMs
  return Math.min(MAX_SWEEP_MS, Math.max(MIN_SWEEP_MS, Math.floor(limit / 10)))
}

function tick (watch: SilenceWatch): void {
  watch.tick(performance.now())
}
