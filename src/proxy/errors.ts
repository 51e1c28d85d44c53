/**
 * The closed set of responses Breakwater generates itself, mapped to status and cause (SPEC §15:
 * who is to blame) in one table. Foreign errors (undici `UND_ERR_*`, socket `E*` codes) are
 * translated here and nowhere else: `fromUpstreamError` (which code), `failureReason` (in words,
 * for the 502/504 body). README's error table is checked against `ERRORS` by a test.
 */
import { STATUS_CODES, type ServerResponse } from 'node:http'

export interface LocalError {
  status: number
  message: string
  /** Value of `x-breakwater-mitigation` when a mitigation caused the refusal. */
  mitigation: string | null
  /** Whose doing the response is (SPEC §15); see context.ts for who counts which. */
  cause: 'upstream' | 'client' | 'breakwater'
}

export const ERRORS = {
  no_route: { status: 404, message: 'no route matches this request', mitigation: null, cause: 'breakwater' },
  feature_disabled: { status: 503, message: 'this feature is switched off', mitigation: 'kill-switch', cause: 'breakwater' },
  circuit_open: { status: 503, message: 'the upstream circuit is open', mitigation: 'circuit-open', cause: 'breakwater' },
  bulkhead_full: { status: 503, message: 'too many concurrent requests to the upstream', mitigation: 'bulkhead', cause: 'breakwater' },
  overloaded: { status: 503, message: 'the sidecar is overloaded', mitigation: null, cause: 'breakwater' },
  upstream_unavailable: { status: 502, message: 'the upstream could not be reached', mitigation: null, cause: 'upstream' },
  upstream_timeout: { status: 504, message: 'the upstream did not answer in time', mitigation: null, cause: 'upstream' },
  bad_request: { status: 400, message: 'malformed request', mitigation: null, cause: 'client' },
  headers_too_large: { status: 431, message: 'request headers too large', mitigation: null, cause: 'client' },
  request_timeout: { status: 408, message: 'the request was not received in time', mitigation: null, cause: 'client' },
  connect_not_supported: { status: 404, message: 'CONNECT is not supported: this is a reverse proxy', mitigation: null, cause: 'client' },
  rate_limited: { status: 429, message: 'too many requests', mitigation: 'rate-limit', cause: 'breakwater' },
  fault_injected: { status: 503, message: 'fault injected (game day)', mitigation: null, cause: 'breakwater' },
  shutdown_deadline: { status: 503, message: 'cut by the shutdown deadline', mitigation: null, cause: 'breakwater' }
} as const satisfies Record<string, LocalError>

export type ErrorCode = keyof typeof ERRORS

/** Codes that only happen before a request exists (the HTTP parser refused the bytes). */
export type ClientErrorCode = 'bad_request' | 'headers_too_large' | 'request_timeout' | 'connect_not_supported'

/**
 * undici refuses to send these because of the request itself (a header it will not forward, a
 * body that does not match its Content-Length): the client's doing, never the upstream's.
 */
const REQUEST_REFUSED = new Set(['UND_ERR_INVALID_ARG', 'UND_ERR_NOT_SUPPORTED', 'UND_ERR_REQ_CONTENT_LENGTH_MISMATCH'])

/** Translate an error from undici or the socket into our code. */
export function fromUpstreamError (err: unknown): 'upstream_unavailable' | 'upstream_timeout' | 'bad_request' {
  const code = (err as { code?: string } | null)?.code
  // UND_ERR_HEADERS_TIMEOUT: the request was fully sent and no response headers came within
  // the route's timeoutMs. Connect timeouts and refused or reset connections mean the
  // upstream could not be reached at all (Envoy's UF), not that it was slow.
  if (code === 'UND_ERR_HEADERS_TIMEOUT' || code === 'BREAKWATER_QUEUE_TIMEOUT' || code === 'BREAKWATER_UPLOAD_STALLED') return 'upstream_timeout'
  if (code !== undefined && REQUEST_REFUSED.has(code)) return 'bad_request'
  return 'upstream_unavailable'
}

/**
 * RFC 9112 §6.3: a 204 or 304 ends at its head, whatever its Content-Length says (RFC 9110 §8.6
 * lets a 304 carry the length of the representation it stands for). undici holds the announced
 * length against the bytes that followed and fails the exchange: the response was complete, and
 * the connection undici closes is its own. True when `err` is only that.
 */
export function endedAtHead (status: number, err: unknown): boolean {
  return (status === 304 || status === 204) && (err as { code?: string } | null)?.code === 'UND_ERR_RES_CONTENT_LENGTH_MISMATCH'
}

/** Failures of an upstream request that undici has no error for, in the same shape. */
export const NO_ENDPOINT = Object.assign(new Error('no endpoint available'), { code: 'BREAKWATER_NO_ENDPOINT' })
export const INVALID_RESPONSE = Object.assign(new Error('invalid response header'), { code: 'BREAKWATER_INVALID_RESPONSE' })
/** A response in a transfer coding other than chunked, which Breakwater cannot pass on (forward.ts). */
export const TRANSFER_CODING = Object.assign(new Error('transfer coding other than chunked'), { code: 'BREAKWATER_TRANSFER_CODING' })
/** The sweep's `timeoutMs` (silence.ts): what undici's own headers timeout would have said. */
export const HEAD_TIMEOUT = Object.assign(new Error('Headers Timeout Error'), { code: 'UND_ERR_HEADERS_TIMEOUT' })
/** The sweep's `idleTimeoutMs` on a request still waiting for a free upstream connection (forward.ts `onSilent`). */
export const QUEUE_TIMEOUT = Object.assign(new Error('no upstream connection free'), { code: 'BREAKWATER_QUEUE_TIMEOUT' })
/** The sweep's `idleTimeoutMs` on a streamed upload the upstream stopped reading (forward.ts `onSilent`). */
export const UPLOAD_STALLED = Object.assign(new Error('the upstream stopped reading the request body'), { code: 'BREAKWATER_UPLOAD_STALLED' })
/** A request ended before undici had a connection for it (forward.ts `onConnect`): never sent. */
export const GIVEN_UP = Object.assign(new Error('the request ended before it was sent'), { code: 'BREAKWATER_GIVEN_UP' })
/** The route's kill switch went off while its request waited to be written upstream (context.ts `killedMeanwhile`). */
export const KILLED_MEANWHILE = Object.assign(new Error('the route was killed before the request was sent'), { code: 'BREAKWATER_KILLED_MEANWHILE' })
/** The sweep's `idleTimeoutMs` on a response body: what undici's own body timeout would have said. */
export const BODY_TIMEOUT = Object.assign(new Error('Body Timeout Error'), { code: 'UND_ERR_BODY_TIMEOUT' })

/** How an upstream request failed, in words for the 502/504 body ("connection refused"). */
export function failureReason (err: unknown, timeoutMs: number): string {
  const code = (err as { code?: string } | null)?.code
  switch (code) {
    case 'ECONNREFUSED': return 'connection refused'
    case 'ECONNRESET': case 'EPIPE': case 'UND_ERR_SOCKET': return 'connection reset before a response'
    case 'UND_ERR_CONNECT_TIMEOUT': return 'connect timed out'
    case 'UND_ERR_HEADERS_TIMEOUT': return `no response headers within ${timeoutMs} ms`
    case 'ENOTFOUND': case 'EAI_AGAIN': return 'host name not resolved'
    case 'EHOSTUNREACH': case 'ENETUNREACH': return 'host unreachable'
    case 'UND_ERR_CLOSED': case 'UND_ERR_DESTROYED': return 'connection pool closed'
    case 'BREAKWATER_NO_ENDPOINT': return 'no endpoint available'
    case 'BREAKWATER_QUEUE_TIMEOUT': return 'no connection free within idleTimeoutMs (every one busy)'
    case 'BREAKWATER_UPLOAD_STALLED': return 'stopped reading the request body for idleTimeoutMs'
    case 'BREAKWATER_INVALID_RESPONSE': return 'invalid response header'
    case 'BREAKWATER_TRANSFER_CODING': return 'a transfer coding other than chunked, which cannot be relayed'
    default: return code === undefined ? 'request failed' : `request failed (${code})`
  }
}

/** `upstream "app" (127.0.0.1:3000): connection refused` — which upstream failed, and how. */
export function upstreamMessage (upstream: string, origin: string | null, reason: string): string {
  const at = origin === null ? '' : ` (${origin.replace(/^[a-z]+:\/\//, '')})`
  return `upstream ${JSON.stringify(upstream)}${at}: ${reason}`
}

/** Errors on which an idempotent request may be tried again: nothing reached the upstream app. */
export function isConnectFailure (err: unknown): boolean {
  const code = (err as { code?: string } | null)?.code
  return code === 'ECONNREFUSED' || code === 'ECONNRESET' || code === 'UND_ERR_SOCKET' ||
    code === 'UND_ERR_CONNECT_TIMEOUT' || code === 'EHOSTUNREACH' || code === 'ENETUNREACH' ||
    code === 'EAI_AGAIN' || code === 'ENOTFOUND' || code === 'EPIPE'
}

/** `{"error": CODE, "message": TEXT, "requestId": ID}` as a string. */
export function errorBody (code: ErrorCode, requestId: string, message?: string): string {
  return `{"error":"${code}","message":${JSON.stringify(message ?? ERRORS[code].message)},"requestId":${JSON.stringify(requestId)}}`
}

/**
 * Send a locally generated response. Sets its own framing (content-length) and the
 * `x-breakwater-error` / `x-breakwater-mitigation` headers (SPEC §3, §14).
 */
export function sendError (res: ServerResponse, code: ErrorCode, requestId: string, close: boolean, extra?: ReadonlyArray<string>, message?: string, status?: number): void {
  const spec: LocalError = ERRORS[code]
  const body = errorBody(code, requestId, message)
  const headers = [
    'content-type', 'application/json; charset=utf-8',
    'content-length', String(Buffer.byteLength(body)),
    'x-breakwater-error', code,
    'x-request-id', requestId
  ]
  if (spec.mitigation !== null) headers.push('x-breakwater-mitigation', spec.mitigation)
  if (extra !== undefined) headers.push(...extra)
  if (close) headers.push('connection', 'close')
  res.writeHead(status ?? spec.status, headers)
  res.end(body)
}

/** A whole raw HTTP/1.1 response for a socket that has no `ServerResponse` (parser errors, upgrades). */
export function rawErrorResponse (code: ErrorCode, requestId = '', extra: ReadonlyArray<string> = [], message?: string, status?: number): string {
  const spec: LocalError = ERRORS[code]
  const body = errorBody(code, requestId, message)
  const sent = status ?? spec.status
  let head = `HTTP/1.1 ${sent} ${STATUS_CODES[sent] ?? 'Error'}\r\n` +
    'content-type: application/json; charset=utf-8\r\n' +
    `content-length: ${Buffer.byteLength(body)}\r\n` +
    `x-breakwater-error: ${code}\r\n`
  if (spec.mitigation !== null) head += `x-breakwater-mitigation: ${spec.mitigation}\r\n`
  if (requestId !== '') head += `x-request-id: ${requestId}\r\n`
  for (let i = 0; i + 1 < extra.length; i += 2) head += `${extra[i] as string}: ${extra[i + 1] as string}\r\n`
  return head + 'connection: close\r\n\r\n' + body
}
