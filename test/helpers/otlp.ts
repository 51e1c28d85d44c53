/**
 * A real local OTLP/HTTP receiver (the collector's `/v1/traces` endpoint, JSON encoding): it
 * decodes every export request into flat spans. `hold()` keeps every answer back until
 * `release()` (a collector that is slow), and `arrived` fires once per export request.
 */
import http from 'node:http'
import { EventEmitter } from 'node:events'
import type { AddressInfo } from 'node:net'

export interface OtlpSpan {
  traceId: string
  spanId: string
  parentSpanId: string
  name: string
  kind: number
  status: { code?: number }
  attributes: Record<string, string | number | boolean>
  resource: Record<string, string | number | boolean>
  startTimeUnixNano: string
  endTimeUnixNano: string
}

export interface OtlpReceiver {
  url: string
  spans: OtlpSpan[]
  /** Every export request: path and content type. */
  requests: Array<{ path: string, contentType: string }>
  arrived: EventEmitter
  hold: () => void
  release: () => void
  close: () => Promise<void>
}

interface KeyValue { key: string, value: { stringValue?: string, intValue?: string | number, boolValue?: boolean, doubleValue?: number } }

function flat (list: KeyValue[] | undefined): Record<string, string | number | boolean> {
  const out: Record<string, string | number | boolean> = {}
  for (const { key, value } of list ?? []) {
    out[key] = value.stringValue ?? (value.intValue !== undefined ? Number(value.intValue) : value.boolValue ?? value.doubleValue ?? '')
  }
  return out
}

export async function startOtlpReceiver (): Promise<OtlpReceiver> {
  let held: Array<() => void> | null = null
  const state: OtlpReceiver = {
    url: '',
    spans: [],
    requests: [],
    arrived: new EventEmitter(),
    hold: () => { held ??= [] },
    release: () => {
      const answers = held ?? []
      held = null
      for (const answer of answers) answer()
    },
    close: async () => {}
  }
  const server = http.createServer((req, res) => {
    const chunks: Buffer[] = []
    req.on('data', (c: Buffer) => chunks.push(c))
    req.on('end', () => {
      state.requests.push({ path: req.url ?? '', contentType: req.headers['content-type'] ?? '' })
      const body = JSON.parse(Buffer.concat(chunks).toString('utf8')) as { resourceSpans: Array<{ resource: { attributes: KeyValue[] }, scopeSpans: Array<{ spans: Array<OtlpSpan & { attributes: KeyValue[] }> }> }> }
      for (const rs of body.resourceSpans) {
        const resource = flat(rs.resource.attributes)
        for (const ss of rs.scopeSpans) {
          for (const span of ss.spans) state.spans.push({ ...span, parentSpanId: span.parentSpanId ?? '', status: span.status ?? {}, attributes: flat(span.attributes), resource })
        }
      }
      const answer = (): void => { res.writeHead(200, { 'content-type': 'application/json' }); res.end('{}') }
      if (held !== null) held.push(answer)
      else answer()
      state.arrived.emit('request')
    })
  })
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve))
  state.url = `http://127.0.0.1:${(server.address() as AddressInfo).port}`
  state.close = async () => {
    held = null
    server.closeAllConnections()
    await new Promise<void>((resolve) => server.close(() => resolve()))
  }
  return state
}
