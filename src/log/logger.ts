/**
 * pino JSON logs on stdout, bounded (SPEC §14): lines go through an asynchronous
 * sonic-boom destination with a size cap, so a stalled stdout drops lines (counted in
 * `breakwater_log_lines_dropped_total`) instead of growing memory or blocking the event loop.
 */
import pino, { type Logger, type DestinationStream } from 'pino'
import type { LogLevel } from '../config/types.js'
import { RawLines } from './lines.js'

export interface LogStats {
  dropped: number
}

/** Bytes of log output held while stdout is not draining. */
const MAX_BUFFERED_BYTES = 4 * 1024 * 1024

export interface CreatedLogger {
  logger: Logger
  /** Lines built as JSON text, written to the logger's destination (the access log). */
  lines: RawLines
  stats: LogStats
  /** Write out what is buffered (at exit). */
  flush: () => void
}

export function createLogger (level: LogLevel, service: string, destination?: DestinationStream): CreatedLogger {
  const stats: LogStats = { dropped: 0 }
  let flush = (): void => {}
  let dest = destination
  if (dest === undefined) {
    const boom = pino.destination({ dest: 1, sync: false, minLength: 0, maxLength: MAX_BUFFERED_BYTES })
    boom.on('drop', () => { stats.dropped++ })
    // EAGAIN/EPIPE on stdout must never take the process down.
    boom.on('error', () => { stats.dropped++ })
    flush = () => { try { boom.flushSync() } catch { /* stdout gone */ } }
    dest = boom
  }
  const logger = pino({
    level,
    base: { service },
    messageKey: 'msg',
    timestamp: pino.stdTimeFunctions.isoTime,
    formatters: { level: (label) => ({ level: label }) },
    redact: { paths: ['authorization', 'cookie', 'headers.authorization', 'headers.cookie', 'token'], censor: '[redacted]' }
  }, dest)
  return { logger, lines: new RawLines(logger, dest, { service }), stats, flush }
}
