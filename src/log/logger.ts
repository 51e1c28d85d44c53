/**
 * pino JSON logs on stdout, bounded (SPEC §14): lines go through an asynchronous
 * sonic-boom destination with a size cap, so a stalled stdout drops lines (counted in
 * `breakwater_log_lines_dropped_total`) instead of growing memory or blocking the event loop.
 *
 * Access-log lines (one per request) are gathered for up to `GATHER_MS` and handed to
 * sonic-boom together: one write to stdout for many requests instead of one each (a write is a
 * trip through libuv's thread pool, which cost more than building the line). They are also made
 * together: a request that ends leaves its context with `RawLines.later`, and the batch's lines
 * are made one after another just before the hand-over, with the code and data they need still
 * in the CPU's caches from the line before (made one at a time between requests, the same lines
 * cost about twice as much). Any other line first makes and hands over what waits, so lines
 * leave in the order written.
 */
import { writeSync } from 'node:fs'
import pino, { type Logger, type DestinationStream } from 'pino'
import type { LogLevel } from '../config/types.js'
import { RawLines, type LaterLine } from './lines.js'

export interface LogStats {
  dropped: number
}

/** Bytes of log output held while stdout is not draining. */
const MAX_BUFFERED_BYTES = 4 * 1024 * 1024

/** The file descriptor the log goes to. */
const STDOUT = 1

/** Access-log text gathered before it is handed over at once (characters). */
const MAX_GATHERED = 64 * 1024

/** Access lines waiting to be made (`RawLines.later`): past it they are made at once. */
const MAX_WAITING = 256

/**
 * The longest an access-log line waits to be handed over. Under load the batch fills
 * `MAX_GATHERED` sooner; at a few hundred requests a second a shorter wait makes batches of a
 * handful of lines, each paying the write's trip (at 10 ms, logging one line in ten cost 5–6 %, at 50 ms 1–4 %).
 */
const GATHER_MS = 50

type Boom = ReturnType<typeof pino.destination>

/** Number of lines in `text` (each ends with a newline). */
function countLines (text: string): number {
  let n = 0
  for (let i = text.indexOf('\n'); i !== -1; i = text.indexOf('\n', i + 1)) n++
  return n
}

/**
 * pino's destination in front of sonic-boom: `write` (pino's lines) goes straight through,
 * `gather` (access lines) waits `GATHER_MS`, or until `MAX_GATHERED` characters are waiting. sonic-boom's cap counts the batch as a whole: a batch
 * that does not fit is dropped, every line of it counted.
 */
class GatheringDestination {
  private gathered = ''
  private timer: NodeJS.Timeout | null = null
  /** sonic-boom holds lines or is writing them (until its `drain`). */
  private busy = false
  private readonly boom: Boom
  /** sonic-boom's file descriptor. */
  private readonly fd: number
  /** Access lines not made yet, in the order their requests ended: made just before a hand-over. */
  private waiting: LaterLine[] = []
  private readonly handOver = (): void => {
    // Making them may fill the text and hand it over first; the rest follows here, in order.
    this.writeWaiting()
    if (this.timer !== null) {
      clearTimeout(this.timer)
      this.timer = null
    }
    if (this.gathered === '') return
    const text = this.gathered
    this.gathered = ''
    this.busy = true
    this.boom.write(text)
  }

  constructor (boom: Boom, fd: number) {
    this.boom = boom
    this.fd = fd
    boom.on('drain', () => { this.busy = false })
  }

  write (line: string): void {
    this.writeWaiting()
    if (this.gathered !== '') this.handOver()
    this.busy = true
    this.boom.write(line)
  }

  gather (line: string): void {
    this.gathered += line
    if (this.gathered.length >= MAX_GATHERED) this.handOver()
    else this.soon()
  }

  /** An access line to make with the batch (`RawLines.later`). */
  later (line: LaterLine): void {
    this.waiting.push(line)
    if (this.waiting.length >= MAX_WAITING) this.writeWaiting()
    else this.soon()
  }

  /** Make the lines waiting, in order; each is gathered as it is made. */
  private writeWaiting (): void {
    const lines = this.waiting
    if (lines.length === 0) return
    this.waiting = []
    for (const line of lines) line.writeLine()
  }

  /** Hand over within `GATHER_MS`. */
  private soon (): void {
    if (this.timer === null) this.timer = setTimeout(this.handOver, GATHER_MS).unref()
  }

  /** Hand everything over and wait until it is written, or `ms` (a stalled stdout). */
  async drain (ms: number): Promise<void> {
    this.handOver()
    if (!this.busy) return
    await new Promise<void>((resolve) => {
      const done = (): void => { clearTimeout(timer); this.boom.off('drain', done); resolve() }
      const timer = setTimeout(done, ms)
      this.boom.once('drain', done)
    })
  }

  /**
   * At exit, with no event loop left: what is gathered goes out synchronously when sonic-boom
   * is idle; else it queues behind sonic-boom's lines, which pino writes out at exit. Never
   * written past a write still in flight (that would cut a line).
   */
  flushSync (): void {
    this.writeWaiting()
    if (this.gathered === '') return
    if (this.busy) {
      this.handOver()
      return
    }
    let bytes = Buffer.from(this.gathered)
    this.gathered = ''
    while (bytes.length > 0) bytes = bytes.subarray(writeSync(this.fd, bytes))
  }
}

export interface CreatedLogger {
  logger: Logger
  /** Lines built as JSON text, written to the logger's destination (the access log). */
  lines: RawLines
  stats: LogStats
  /** Write out what is buffered, synchronously (at exit). */
  flush: () => void
  /** Wait, up to `ms`, until what is buffered is written (at shutdown). */
  drain: (ms: number) => Promise<void>
}

export function createLogger (level: LogLevel, service: string, destination?: DestinationStream): CreatedLogger {
  const stats: LogStats = { dropped: 0 }
  let flush = (): void => {}
  let drain = async (_ms: number): Promise<void> => {}
  let dest = destination
  let write: (line: string) => void
  let later: ((line: LaterLine) => void) | undefined
  if (dest === undefined) {
    const boom = pino.destination({ dest: STDOUT, sync: false, minLength: 0, maxLength: MAX_BUFFERED_BYTES })
    boom.on('drop', (text: string) => { stats.dropped += countLines(text) })
    // EAGAIN/EPIPE on stdout must never take the process down.
    boom.on('error', () => { stats.dropped++ })
    const at = new GatheringDestination(boom, STDOUT)
    flush = () => { try { at.flushSync() } catch { /* stdout gone */ } }
    drain = async (ms) => { await at.drain(ms) }
    dest = at
    write = (line) => { at.gather(line) }
    later = (line) => { at.later(line) }
  } else {
    const given = dest
    write = (line) => { given.write(line) }
  }
  const logger = pino({
    level,
    base: { service },
    messageKey: 'msg',
    timestamp: pino.stdTimeFunctions.isoTime,
    formatters: { level: (label) => ({ level: label }) },
    redact: { paths: ['authorization', 'cookie', 'headers.authorization', 'headers.cookie', 'token'], censor: '[redacted]' }
  }, dest)
  return { logger, lines: new RawLines(logger, write, { service }, later), stats, flush, drain }
}
