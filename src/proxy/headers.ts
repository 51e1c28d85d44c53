/**
 * Header policy, both directions. RFC 9110 §7.6.1: hop-by-hop headers (Connection, the headers
 * it names, Keep-Alive, Proxy-Connection, TE, Trailer, Transfer-Encoding, Upgrade) describe one
 * connection and are never forwarded. Requests gain x-forwarded-for/-proto/-host and keep or
 * get an x-request-id; trace headers (tracestate, b3) pass untouched, and so does one traceparent
 * unless tracing is on (trace.ts: the upstream gets ours, and no tracestate with a trace we start).
 *
 * Headers stay flat arrays (`[name, value, name, value]`) end to end: Node gives us
 * `req.rawHeaders`, undici takes and returns flat arrays, and `res.writeHead` accepts one.
 */

/** What the request head told us while its headers were copied. */
export interface RequestHead {
  /** Headers for the upstream request. */
  headers: string[]
  /** The Host header as sent ('' when absent). */
  host: string
  /**
   * `host` as routes read it (route-table.ts `hostKey`), worked out on first use by
   * `requestHostKey` and kept: route matching, the absolute-form check and the fallback cache's
   * key all read it, and a request that needs none of them never pays for it. null until then.
   */
  hostKey: string | null
  requestId: string
  hasBody: boolean
  /** The body's length from Content-Length, or -1 when it is chunked (or absent: 0). */
  bodyLength: number
  isWebSocket: boolean
  /**
   * Why this request cannot be forwarded as sent (RFC 9112 §3.2, §6.3: more than one Host,
   * conflicting Content-Lengths, Content-Length with Transfer-Encoding), or null. The pipeline
   * answers 400 and closes the connection before any upstream contact (SPEC §15).
   */
  invalid: string | null
  /** `x-breakwater-synthetic`: the incident whose verification probe this claims to be ('' for none). */
  synthetic: string
  /** `x-breakwater-probe`: the sidecar's probe key, which only its own verifier knows; never forwarded. */
  probeKey: string
  /** The client's `traceparent` ('' when absent or sent more than once: W3C Trace Context §3.2 makes that invalid). */
  traceparent: string
  /** Where its value sits in `headers` (one copy forwarded; the trace stage may replace it), or -1. */
  traceparentAt: number
  /** It carries `tracestate` (forwarded; the trace stage drops it with a trace it starts). */
  tracestate: boolean
  /** It carries `Expect` (never forwarded; see `awaitingContinue` in the pipeline). */
  expects: boolean
}

/** Hop-by-hop names, lower case (RFC 9110 §7.6.1 plus the legacy Keep-Alive and Proxy-Connection). */
function isHopByHop (lower: string): boolean {
  switch (lower) {
    case 'connection': case 'keep-alive': case 'proxy-connection': case 'te':
    case 'trailer': case 'transfer-encoding': case 'upgrade':
      return true
    default:
      return false
  }
}

/** Names listed in Connection values other than the common close/keep-alive/upgrade tokens. */
function connectionListed (value: string, into: Set<string> | null): Set<string> | null {
  for (const token of value.split(',')) {
    const t = token.trim().toLowerCase()
    if (t === '' || t === 'close' || t === 'keep-alive' || t === 'upgrade') continue
    into ??= new Set()
    into.add(t)
  }
  return into
}

/**
 * RFC 9110 §7.2, RFC 3986 §3.2.2: `uri-host [ ":" port ]` — a reg-name, an IPv4 address or a
 * bracketed IP literal, in the characters those allow. Anything else (a space, a slash, an `@`)
 * would reach the app as a host it was never meant to see.
 */
const HOST = /^[A-Za-z0-9._~%!$&'()*+,;=:[\]-]*$/

/**
 * Whether `head` is this process's own verification probe: it carries the probe key, which no
 * client can know (SPEC §15). A claimed probe without it is a client's request like any other.
 */
export function isOwnProbe (head: RequestHead, probeKey: string): boolean {
  return head.synthetic !== '' && head.probeKey === probeKey
}

/**
 * Copy the client's headers for the upstream, in one pass over `raw` (plus one to find
 * Connection when it lists extra names).
 * Upgrade and Connection are dropped here too; a WebSocket handshake (`isWebSocket`) gets
 * them back from undici's `upgrade` option, the one exception to hop-by-hop removal (SPEC §14).
 * @param newRequestId called only when the client sent no x-request-id
 */
export function requestHead (raw: readonly string[], remoteAddress: string, proto: string, newRequestId: () => string): RequestHead {
  let listed: Set<string> | null = null
  let upgradeWebSocket = false
  let connectionUpgrade = false
  for (let i = 0; i < raw.length; i += 2) {
    const name = raw[i] as string
    if (name.length === 10 && name.toLowerCase() === 'connection') {
      const value = raw[i + 1] as string
      // Any name it lists is hop-by-hop, however short (`Connection: x-api-key`).
      if (value !== 'keep-alive' && value !== 'close') listed = connectionListed(value, listed)
      if (/\bupgrade\b/i.test(value)) connectionUpgrade = true
    } else if (name.length === 7 && name.toLowerCase() === 'upgrade') {
      upgradeWebSocket = (raw[i + 1] as string).trim().toLowerCase() === 'websocket'
    }
  }
  const isWebSocket = connectionUpgrade && upgradeWebSocket
  const headers: string[] = []
  let host = ''
  let requestId = ''
  let forwardedFor = ''
  let hasBody = false
  let hosts = 0
  let contentLength: string | null = null
  let chunked = false
  let invalid: string | null = null
  let traceparent = ''
  let traceparentAt = -1
  let tracestate = false
  let synthetic = ''
  let probeKey = ''
  let expects = false
  for (let i = 0; i < raw.length; i += 2) {
    const name = raw[i] as string
    const value = raw[i + 1] as string
    const lower = name.toLowerCase()
    switch (lower) {
      case 'host':
        if (++hosts > 1) invalid = 'more than one Host header'
        else if (!HOST.test(value)) invalid = 'an invalid Host header'
        host = value
        headers.push(name, value)
        continue
      case 'x-request-id':
        if (requestId === '') requestId = value
        continue
      case 'x-forwarded-for':
        forwardedFor = forwardedFor === '' ? value : `${forwardedFor}, ${value}`
        continue
      case 'x-forwarded-proto':
      case 'x-forwarded-host':
        continue // set by us below, from what this listener saw
      case 'content-length':
        if (contentLength !== null) {
          if (value !== contentLength) invalid = 'conflicting Content-Length headers'
          continue // one copy is enough (RFC 9110 §8.6)
        }
        contentLength = value
        if (value !== '0') hasBody = true
        headers.push(name, value)
        continue
      case 'transfer-encoding':
        // Breakwater frames the body again for the upstream, and can say only `chunked`: a
        // coding before it (`gzip, chunked`) would reach the app as if the coded bytes were the
        // body. Refused rather than guessed (RFC 9112 §6.1); Node takes such a request.
        if (chunked || (value.length === 7 ? value.toLowerCase() : value.trim().toLowerCase()) !== 'chunked') invalid = 'a Transfer-Encoding other than chunked'
        hasBody = true
        chunked = true
        continue
      case 'expect':
        // Met here, as Envoy does by default (undici cannot send it on): `100 Continue` once
        // the request is to be forwarded (the pipeline's `awaitingContinue`).
        expects = true
        continue
      case 'x-breakwater-synthetic':
        synthetic = value
        break // forwarded
      case 'x-breakwater-probe':
        probeKey = value
        continue
      case 'tracestate':
        tracestate = true
        break // forwarded
      case 'traceparent':
        if (traceparentAt === -1) {
          traceparent = value
          traceparentAt = headers.length + 1
          headers.push(name, value)
        } else {
          traceparent = ''
        }
        continue
    }
    if (isHopByHop(lower) || (listed !== null && listed.has(lower))) continue
    headers.push(name, value)
  }
  if (chunked && contentLength !== null) invalid = 'Content-Length with Transfer-Encoding'
  if (requestId === '') requestId = newRequestId()
  const client = remoteAddress.startsWith('::ffff:') ? remoteAddress.slice(7) : remoteAddress
  headers.push(
    'x-request-id', requestId,
    'x-forwarded-for', forwardedFor === '' ? client : `${forwardedFor}, ${client}`,
    'x-forwarded-proto', proto
  )
  if (host !== '') headers.push('x-forwarded-host', host)
  const bodyLength = chunked ? -1 : contentLength === null ? 0 : Number(contentLength)
  return { headers, host, hostKey: null, requestId, hasBody, bodyLength, isWebSocket, invalid, synthetic, probeKey, traceparent, traceparentAt, tracestate, expects }
}

/**
 * The upstream's response headers for the client: latin1 strings (byte-transparent, which is
 * what Node writes headers as), hop-by-hop removed, and for a `204` its Content-Length.
 */
export function responseHeaders (raw: readonly Buffer[], close: boolean, status = 200): string[] {
  let listed: Set<string> | null = null
  for (let i = 0; i < raw.length; i += 2) {
    const name = raw[i] as Buffer
    if (name.length === 10 && name.toString('latin1').toLowerCase() === 'connection') {
      listed = connectionListed((raw[i + 1] as Buffer).toString('latin1'), listed)
    }
  }
  const out: string[] = []
  for (let i = 0; i < raw.length; i += 2) {
    const name = (raw[i] as Buffer).toString('latin1')
    const lower = name.toLowerCase()
    if (isHopByHop(lower) || (listed !== null && listed.has(lower))) continue
    // RFC 9110 §8.6: a 204 MUST NOT carry Content-Length (nginx drops it too); one relayed would
    // have a client or cache in front wait for, or mis-frame, a body that never comes. A 304
    // keeps it: there it is the length of the representation it stands for.
    if (status === 204 && lower === 'content-length') continue
    out.push(name, (raw[i + 1] as Buffer).toString('latin1'))
  }
  if (close) out.push('connection', 'close')
  return out
}

/** Value of the first header called `lower` in a raw undici header list, or null. */
export function rawHeaderValue (raw: readonly Buffer[], lower: string): string | null {
  for (let i = 0; i < raw.length; i += 2) {
    const name = raw[i] as Buffer
    if (name.length === lower.length && name.toString('latin1').toLowerCase() === lower) return (raw[i + 1] as Buffer).toString('latin1')
  }
  return null
}
