/**
 * W3C Trace Context for one request (SPEC §18), the per-request half of tracing; the export half
 * (ops/tracing.ts) loads only when `tracing` is configured.
 *
 * With tracing on, every request gets a span id of ours. A valid incoming `traceparent` is
 * continued (its trace id, its parent id as our parent, its sampled flag: parent-based
 * sampling); an absent or invalid one starts a new trace, sampled at `sampleRatio`. The
 * upstream receives a `traceparent` naming our span as its parent, so its own span parents on
 * the sidecar's server span; `tracestate` passes untouched with a continued trace and is dropped
 * with a new one (W3C Trace Context §4.2: without a valid traceparent it is invalid and MUST be
 * discarded; its entries describe a trace this request is no longer part of). Only a sampled request has a span
 * recorded, when it ends (context.ts `end`); an unsampled one costs two ids and a header.
 *
 * With tracing off, the sidecar is not a hop of the trace: `traceparent` passes untouched and
 * the access log carries the incoming trace id and parent id, when there is one.
 */
import { randomFillSync } from 'node:crypto'
import type { RequestContext } from './context.js'
import type { Route } from './route-table.js'

/** What the data plane needs of the export half. */
export interface SpanExport {
  /** Share of new traces sampled (a continued trace follows its sampled flag). */
  readonly sampleRatio: number
  /** Queue the server span of a sampled request that has just ended; never blocks, never throws. */
  add (ctx: RequestContext): void
}

/** The sidecar's tracing, filled in once the exporter has loaded; `exporter` null = tracing off. */
export interface Tracing {
  exporter: SpanExport | null
}

/**
 * W3C Trace Context §3.2: version-traceid-parentid-flags, lower-case hex. Version ff is invalid;
 * a later version may append fields after a dash, version 00 may not.
 */
const TRACEPARENT = /^([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})(-|$)/
const ZERO_TRACE = '00000000000000000000000000000000'
const ZERO_SPAN = '0000000000000000'

/** The parts of a valid `traceparent`, or null (absent, malformed, all-zero ids, version ff). */
function parseTraceparent (value: string): RegExpExecArray | null {
  const m = TRACEPARENT.exec(value)
  if (m === null) return null
  const version = m[1] as string
  if (version === 'ff' || (version === '00' && value.length !== 55)) return null
  if (m[2] === ZERO_TRACE || m[3] === ZERO_SPAN) return null
  return m
}

/**
 * Ready-made ids, drawn in blocks. A block is one text of `IDS_PER_BLOCK` unsampled
 * `traceparent` values of a new trace back to back (`00-<trace id>-<span id>-00`, 55 characters
 * each): the dashes are written once, a refill writes only the hex digits, and a request takes
 * its `traceparent`, trace id and span id as three slices of that text (no string built per
 * request).
 *
 * The digits come from xoshiro128** seeded by the operating system at start-up. W3C Trace Context
 * asks ids to be random and unique, not secret (OpenTelemetry's own generator uses
 * `Math.random`); the operating system's generator, called once per block, was a fifth of what
 * tracing cost an unsampled request, and this generator writes a block in about half the time
 * of `Math.random`.
 */
const TRACEPARENT_LENGTH = 55
const IDS_PER_BLOCK = 128
const block = Buffer.from(`00-${ZERO_TRACE}-${ZERO_SPAN}-00`.repeat(IDS_PER_BLOCK), 'latin1')
const blockView = new DataView(block.buffer, block.byteOffset, block.length)
let blockText = ''
let next = IDS_PER_BLOCK

/** Two hex digits of each byte value, as the little-endian 16-bit word that writes them. */
const HEX_PAIRS = new Uint16Array(256)
for (let byte = 0; byte < 256; byte++) {
  HEX_PAIRS[byte] = '0123456789abcdef'.charCodeAt(byte >> 4) | ('0123456789abcdef'.charCodeAt(byte & 15) << 8)
}

/** xoshiro128** (Blackman and Vigna): 32 random bits per call; its state never all zero. */
const state = new Uint32Array(4)
do randomFillSync(state); while ((state[0] | state[1] | state[2] | state[3]) === 0)

function random32 (): number {
  const s = state
  const s1 = s[1] as number
  const result = Math.imul(rotl(Math.imul(s1, 5), 7), 9) >>> 0
  const t = s1 << 9
  s[2] = (s[2] as number) ^ (s[0] as number)
  s[3] = (s[3] as number) ^ s1
  s[1] = s1 ^ (s[2] as number)
  s[0] = (s[0] as number) ^ (s[3] as number)
  s[2] = (s[2] as number) ^ t
  s[3] = rotl(s[3] as number, 11)
  return result
}

function rotl (x: number, k: number): number {
  return (x << k) | (x >>> (32 - k))
}

/** Write `count` (a multiple of 8) random hex digits into `block` at `at`. */
function writeHex (at: number, count: number): void {
  for (let end = at + count; at < end; at += 8) {
    const word = random32()
    blockView.setUint16(at, HEX_PAIRS[word >>> 24] as number, true)
    blockView.setUint16(at + 2, HEX_PAIRS[(word >>> 16) & 255] as number, true)
    blockView.setUint16(at + 4, HEX_PAIRS[(word >>> 8) & 255] as number, true)
    blockView.setUint16(at + 6, HEX_PAIRS[word & 255] as number, true)
  }
}

function refill (): void {
  for (let i = 0, at = 0; i < IDS_PER_BLOCK; i++, at += TRACEPARENT_LENGTH) {
    writeHex(at + 3, 32)
    writeHex(at + 36, 16)
  }
  blockText = block.toString('latin1')
  next = 0
}

/**
 * The offset in `blockText` of the next unused `traceparent`, never one with an all-zero id
 * (W3C: invalid; one in 2^64 draws).
 */
function takeIds (): number {
  for (;;) {
    if (next === IDS_PER_BLOCK) refill()
    const at = next++ * TRACEPARENT_LENGTH
    if (blockText.startsWith(ZERO_TRACE, at + 3) || blockText.startsWith(ZERO_SPAN, at + 36)) continue
    return at
  }
}

/**
 * The trace stage: read the incoming `traceparent` (`incoming`, '' when none) and, with tracing
 * on, take our place in the trace and tell the upstream (`headers[at]`, the incoming header's
 * value, or a new header when `at` is -1); `tracestate`: `headers` carry one.
 */
export function beginTrace (ctx: RequestContext, tracing: Tracing, incoming: string, headers: string[] | null, at: number, tracestate = false): void {
  const parent = incoming === '' ? null : parseTraceparent(incoming)
  const exporter = tracing.exporter
  if (exporter === null) {
    // Not a hop of the trace: the log names the caller's span, the one the upstream will parent on.
    if (parent !== null) {
      ctx.traceId = parent[2] as string
      ctx.spanId = parent[3] as string
    }
    return
  }
  const id = takeIds()
  const text = blockText
  ctx.spanId = text.slice(id + 36, id + 52)
  let traceparent: string
  let sampled: boolean
  if (parent !== null) {
    ctx.traceId = parent[2] as string
    ctx.parentSpanId = parent[3] as string
    sampled = (parseInt(parent[4] as string, 16) & 1) === 1
    traceparent = `00-${ctx.traceId}-${ctx.spanId}-${sampled ? '01' : '00'}`
  } else {
    ctx.traceId = text.slice(id + 3, id + 35)
    sampled = exporter.sampleRatio >= 1 || (exporter.sampleRatio > 0 && Math.random() < exporter.sampleRatio)
    traceparent = sampled ? text.slice(id, id + 53) + '01' : text.slice(id, id + TRACEPARENT_LENGTH)
  }
  if (sampled) ctx.spanExport = exporter
  if (headers === null) return
  if (at >= 0) headers[at] = traceparent
  else headers.push('traceparent', traceparent)
  if (parent === null && tracestate) dropTracestate(headers)
}

/** Remove every `tracestate` field from flat `headers` (rare: a caller's state with a trace we start). */
function dropTracestate (headers: string[]): void {
  let to = 0
  for (let from = 0; from < headers.length; from += 2) {
    if ((headers[from] as string).toLowerCase() === 'tracestate') continue
    headers[to++] = headers[from] as string
    headers[to++] = headers[from + 1] as string
  }
  headers.length = to
}

/** `traceparent` of a request refused before its head was read (admission): from Node's parsed headers. */
export function incomingTraceparent (ctx: RequestContext): string {
  const value = ctx.req.headers.traceparent
  return typeof value === 'string' ? value : ''
}

// ---- OpenTelemetry HTTP semantic conventions, shared by the span and the access-log line ----

/** `http.route`: the route's path, or its prefix as a template (`/api/*`); null when it matches on neither. */
export function httpRoute (route: Route | null): string | null {
  if (route === null) return null
  const { path, pathPrefix } = route.config.match
  return path ?? (pathPrefix === null ? null : `${pathPrefix}*`)
}

/** `error.type`: our code when we produced or cut the response, else an upstream's 5xx as a string. */
export function errorType (ctx: RequestContext): string | undefined {
  if (ctx.errorCode !== null) return ctx.errorCode
  return ctx.status >= 500 ? String(ctx.status) : undefined
}

/** OpenTelemetry's server span rule: 5xx (and a response the upstream cut short or stalled) is an error; 4xx is the client's. */
export function isServerError (ctx: RequestContext): boolean {
  return ctx.status >= 500 || ctx.errorCode === 'upstream_reset' || ctx.errorCode === 'upstream_timeout'
}

/** `server.address`: the Host header without its port (`[::1]:80` → `::1`); undefined without one. */
export function hostAddress (host: string): string | undefined {
  if (host === '') return undefined
  if (host.startsWith('[')) {
    const end = host.indexOf(']')
    return end === -1 ? host : host.slice(1, end)
  }
  const colon = host.indexOf(':')
  return colon === -1 ? host : host.slice(0, colon)
}

/** `server.port`: the Host header's port, or the scheme's default. */
export function hostPort (host: string, scheme: string): number {
  const colon = host.lastIndexOf(':')
  if (colon !== -1 && colon > host.lastIndexOf(']')) {
    const port = Number(host.slice(colon + 1))
    if (Number.isInteger(port) && port > 0) return port
  }
  return scheme === 'https' ? 443 : 80
}

/** The request's Host (from its head, or Node's parsed headers when refused before it). */
export function requestHost (ctx: RequestContext): string {
  return ctx.head?.host ?? ctx.req.headers.host ?? ''
}

/** `network.peer.address`: the peer, without the IPv4-mapped prefix. */
export function peerAddress (ctx: RequestContext): string | undefined {
  const peer = ctx.clientSocket.remoteAddress
  return peer?.startsWith('::ffff:') === true ? peer.slice(7) : peer
}

/** `user_agent.original`, read from the raw headers (no parsed-header object built). */
export function userAgent (raw: readonly string[]): string | undefined {
  for (let i = 0; i < raw.length; i += 2) {
    const name = raw[i] as string
    if (name.length === 10 && name.toLowerCase() === 'user-agent') return raw[i + 1]
  }
  return undefined
}

/** Methods OpenTelemetry knows; any other is reported as `_OTHER` (HTTP semantic conventions). */
const KNOWN_METHODS = new Set(['CONNECT', 'DELETE', 'GET', 'HEAD', 'OPTIONS', 'PATCH', 'POST', 'PUT', 'QUERY', 'TRACE'])

/** `http.request.method`. */
export function requestMethod (method: string): string {
  return KNOWN_METHODS.has(method) ? method : '_OTHER'
}
