/**
 * The closed set of responses Breakwater generates itself, mapped to status in one table.
 * Foreign errors (undici `UND_ERR_*`, socket `E*` codes) are translated in `fromUpstreamError`,
 * the one place that knows them. README's error table is checked against `ERRORS` by a test.
 */
import type { ServerResponse } from 'node:http'

export interface LocalError {
  status: number
  message: string
  /** Value of `x-breakwater-mitigation` when a mitigation caused the refusal. */
  mitigation: string | null
}

export const ERRORS = {
  no_route: { status: 404, message: 'no route matches this request', mitigation: null },
  feature_disabled: { status: 503, message: 'this feature is switched off', mitigation: 'kill-switch' },
  circuit_open: { status: 503, message: 'the upstream circuit is open', mitigation: 'circuit-open' },
  bulkhead_full: { status: 503, message: 'too many concurrent requests to the upstream', mitigation: 'bulkhead' },
  overloaded: { status: 503, message: 'the sidecar is overloaded', mitigation: null },
  upstream_unavailable: { status: 502, message: 'the upstream could not be reached', mitigation: null },
  upstream_timeout: { status: 504, message: 'the upstream did not answer in time', mitigation: null },
  bad_request: { status: 400, message: 'malformed request', mitigation: null },
  headers_too_large: { status: 431, message: 'request headers too large', mitigation: null },
  request_timeout: { status: 408, message: 'the request was not received in time', mitigation: null },
  connect_not_supported: { status: 404, message: 'CONNECT is not supported: this is a reverse proxy', mitigation: null },
  fault_injected: { status: 503, message: 'fault injected (game day)', mitigation: null }
} as const satisfies Record<string, LocalError>

export type ErrorCode = keyof typeof ERRORS

/** Codes that only happen before a request exists (the HTTP parser refused the bytes). */
export type ClientErrorCode = 'bad_request' | 'headers_too_large' | 'request_timeout' | 'connect_not_supported'

/** Translate an error from undici or the socket into our code. */
export function fromUpstreamError (err: unknown): 'upstream_unavailable' | 'upstream_timeout' {
  const code = (err as { code?: string } | null)?.code
  // UND_ERR_HEADERS_TIMEOUT: the request was fully sent and no response headers came within
  // the route's timeoutMs. Connect timeouts and refused or reset connections mean the
  // upstream could not be reached at all (Envoy's UF), not that it was slow.
  if (code === 'UND_ERR_HEADERS_TIMEOUT') return 'upstream_timeout'
  return 'upstream_unavailable'
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
export function rawErrorResponse (code: ErrorCode, requestId = '', extra: ReadonlyArray<string> = []): string {
  const spec: LocalError = ERRORS[code]
  const body = errorBody(code, requestId)
  let head = `HTTP/1.1 ${spec.status} ${STATUS_TEXT[spec.status] ?? 'Error'}\r\n` +
    'content-type: application/json; charset=utf-8\r\n' +
    `content-length: ${Buffer.byteLength(body)}\r\n` +
    `x-breakwater-error: ${code}\r\n`
  if (spec.mitigation !== null) head += `x-breakwater-mitigation: ${spec.mitigation}\r\n`
  if (requestId !== '') head += `x-request-id: ${requestId}\r\n`
  for (let i = 0; i + 1 < extra.length; i += 2) head += `${extra[i] as string}: ${extra[i + 1] as string}\r\n`
  return head + 'connection: close\r\n\r\n' + body
}

const STATUS_TEXT: Record<number, string> = {
  400: 'Bad Request', 404: 'Not Found', 408: 'Request Timeout', 431: 'Request Header Fields Too Large',
  502: 'Bad Gateway', 503: 'Service Unavailable', 504: 'Gateway Timeout'
}
