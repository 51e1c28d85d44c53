/**
 * Log lines built as JSON text, for the line written per request (the access log): the caller
 * writes its fields as JSON text (`jsonString` for every string), `RawLines` puts pino's
 * `level`, `time` and bindings in front and `msg` behind and writes the line to the logger's
 * own destination (logger.ts gathers them for one write per event-loop turn). The line has
 * the shape of pino's lines and keeps its place among them, without pino's per-call object walk.
 */
import type { Logger } from 'pino'

/**
 * `s` as a JSON string literal. Anything a client sent (a path, a header) may hold quotes,
 * backslashes or control characters: those are escaped as `JSON.stringify` does, so a line
 * stays one JSON object whatever the request held.
 */
export function jsonString (s: string): string {
  return NEEDS_ESCAPE.test(s) ? JSON.stringify(s) : '"' + s + '"'
}

/** What `JSON.stringify` escapes: control characters, `"`, `\\` and surrogates (it escapes lone ones). A compiled scan beats a `charCodeAt` loop. */
const NEEDS_ESCAPE = /[\u0000-\u001f"\\\ud800-\udfff]/

/**
 * `key` and `value` as a JSON member, `,"key":"value"`, remembered: the values a sidecar logs
 * over and over (its routes, upstreams and endpoints, its clients' addresses and user agents)
 * are escaped and concatenated once. Holds up to `MEMBER_LIMIT` values of up to
 * `MEMBER_MAX_LENGTH` characters, then starts afresh, so values that never repeat (a client
 * sending a new user agent with every request) cost a lookup more than `jsonString`, and at
 * most a few hundred KiB.
 */
export class JsonMembers {
  private readonly prefix: string
  private readonly known = new Map<string, string>()
  /** The value asked for last and its member: most lines repeat the line before. */
  private last = ''
  private lastMember = ''

  constructor (key: string) {
    this.prefix = `,${jsonString(key)}:`
  }

  of (value: string): string {
    if (value === this.last && this.lastMember !== '') return this.lastMember
    // A client's header can be kilobytes long: not worth keeping 512 of.
    if (value.length > MEMBER_MAX_LENGTH) return this.prefix + jsonString(value)
    let member = this.known.get(value)
    if (member === undefined) {
      if (this.known.size >= MEMBER_LIMIT) this.known.clear()
      member = this.prefix + jsonString(value)
      this.known.set(value, member)
    }
    this.last = value
    this.lastMember = member
    return member
  }
}

/** The most values one `JsonMembers` remembers, and the longest it remembers (characters). */
const MEMBER_LIMIT = 512
const MEMBER_MAX_LENGTH = 256

/** A number as JSON has it (`null` for NaN and the infinities, as pino writes them). */
export function jsonNumber (n: number): string {
  return Number.isFinite(n) ? String(n) : 'null'
}

/**
 * `micros / 1000` as JSON has it (`String(micros / 1000)`) for a whole number of microseconds,
 * without formatting a double: the milliseconds, then up to three decimals without trailing zeros.
 */
export function jsonMillis (micros: number): string {
  if (!Number.isSafeInteger(micros) || micros < 0 || micros >= 1e15) return jsonNumber(micros / 1000)
  const frac = micros % 1000
  const whole = String((micros - frac) / 1000)
  if (frac === 0) return whole
  const digits = frac < 10 ? '00' + String(frac) : frac < 100 ? '0' + String(frac) : String(frac)
  return whole + '.' + (digits.charCodeAt(2) !== 48 ? digits : digits.charCodeAt(1) !== 48 ? digits.slice(0, 2) : digits.slice(0, 1))
}

/** pino's level numbers for the two levels a request line uses. */
const LEVELS = { info: 30, warn: 40 } as const

/** A line up to its time's value. */
const LINE_STARTS = { info: '{"level":"info","time":"', warn: '{"level":"warn","time":"' } as const

/** A line whose text is made later (`RawLines.later`), by what it tells of. */
export interface LaterLine {
  /** Make the line now and write it with `RawLines.write`. */
  writeLine: () => void
}

function writeNow (line: LaterLine): void {
  line.writeLine()
}

export class RawLines {
  private readonly logger: Logger
  /** Writes a whole line to the logger's destination (or gathers it for the turn's write, logger.ts). */
  private readonly out: (line: string) => void
  /** Takes a line to make with the destination's next batch (logger.ts), or makes it now. */
  private readonly outLater: (line: LaterLine) => void
  /** `","service":"…"`: the time's closing quote and the logger's bindings, as pino writes them after `time`. */
  private readonly bindings: string
  /** `,"msg":"…"` for the messages written. */
  private readonly endings = new JsonMembers('msg')
  /** The second `timePrefix` is for, in ms since the epoch (a multiple of 1000). */
  private second = -1
  /** `YYYY-MM-DDTHH:MM:SS.` of `second`. */
  private timePrefix = ''

  constructor (logger: Logger, out: (line: string) => void, bindings: Record<string, string>, later: (line: LaterLine) => void = writeNow) {
    this.logger = logger
    this.out = out
    this.outLater = later
    let b = ''
    for (const [key, value] of Object.entries(bindings)) b += `,${jsonString(key)}:${jsonString(value)}`
    this.bindings = '"' + b
  }

  /** Whether the logger's level (which a reload may change) lets `level` through. */
  enabled (level: keyof typeof LEVELS): boolean {
    return this.logger.levelVal <= LEVELS[level]
  }

  /**
   * Write `{"level":…,"time":…,<bindings><fields>,"msg":…}` and a newline. `fields` is empty or
   * starts with a comma; the caller has checked `enabled(level)`. `time`: ms since the epoch.
   */
  write (level: keyof typeof LEVELS, fields: string, msg: string, time: number = Date.now()): void {
    this.out(LINE_STARTS[level] + this.isoTime(time) + this.bindings + fields + this.endings.of(msg) + '}\n')
  }

  /** Make `line` with the next batch (when the destination gathers lines), or now. */
  later (line: LaterLine): void {
    this.outLater(line)
  }

  /** `new Date(ms).toISOString()`, formatting the date once a second. */
  isoTime (ms: number): string {
    let millis = ms % 1000
    if (millis < 0) millis += 1000 // before 1970
    const second = ms - millis
    if (second !== this.second) {
      this.second = second
      this.timePrefix = new Date(second).toISOString().slice(0, 20)
    }
    return this.timePrefix + (millis < 10 ? '00' : millis < 100 ? '0' : '') + String(millis) + 'Z'
  }
}
