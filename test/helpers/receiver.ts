/**
 * A real local HTTP receiver for webhooks (rollback, notifications): records every request
 * with its parsed JSON body and answers with what the test scripts.
 */
import http from 'node:http'
import type { AddressInfo } from 'node:net'

export interface Delivery {
  method: string
  url: string
  headers: http.IncomingHttpHeaders
  body: any
  at: number
}

export interface Receiver {
  url: string
  deliveries: Delivery[]
  /** Status codes to answer with, in order; the last one repeats. */
  respond: number[]
  /** Milliseconds to wait before answering. */
  delayMs: number
  /** Deliveries answered so far (a delay holds the answer back). */
  answered: number
  /** Answer every delivery held back by `delayMs` now. */
  release: () => void
  /** The JSON body to answer a delivery with (default `{"ok":true}`). */
  answer: (d: Delivery) => unknown
  /** Headers to answer a delivery with, beside its content-type (default none). */
  answerHeaders: (d: Delivery) => Record<string, string>
  close: () => Promise<void>
}

export async function startReceiver (respond: number[] = [200]): Promise<Receiver> {
  // Answers held back by delayMs; close() drops them so a long delay never keeps the process alive.
  const held = new Map<NodeJS.Timeout, () => void>()
  const release = (): void => {
    for (const [timer, send] of [...held]) { clearTimeout(timer); send() }
  }
  const state: Receiver = { url: '', deliveries: [], respond, delayMs: 0, answered: 0, release, answer: () => ({ ok: true }), answerHeaders: () => ({}), close: async () => {} }
  const server = http.createServer((req, res) => {
    let text = ''
    req.on('data', (c: Buffer) => { text += c.toString('utf8') })
    req.on('end', () => {
      let body: unknown = text
      try { body = JSON.parse(text) } catch {}
      const delivery: Delivery = { method: req.method ?? '', url: req.url ?? '', headers: req.headers, body, at: Date.now() }
      const n = state.deliveries.push(delivery)
      const status = state.respond[Math.min(n - 1, state.respond.length - 1)] ?? 200
      const answer = JSON.stringify(state.answer(delivery))
      const headers = { ...state.answerHeaders(delivery), 'content-type': 'application/json' }
      const send = (): void => {
        held.delete(timer)
        state.answered++
        res.writeHead(status, headers)
        res.end(answer)
      }
      const timer = setTimeout(send, state.delayMs)
      held.set(timer, send)
    })
  })
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve))
  state.url = `http://127.0.0.1:${(server.address() as AddressInfo).port}`
  state.close = async () => {
    for (const timer of held.keys()) clearTimeout(timer)
    held.clear()
    server.closeAllConnections()
    await new Promise<void>((resolve) => server.close(() => resolve()))
  }
  return state
}
