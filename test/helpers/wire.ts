/**
 * Bytes on a socket for tests that need to see exactly what crossed the wire: parse a raw
 * HTTP/1.1 response, and a connected socket whose received bytes can be awaited.
 */
import net from 'node:net'
import { once } from 'node:events'

export interface RawResponse {
  status: number
  /** Lower-cased names; repeated headers joined with ", ". */
  headers: Record<string, string>
  body: string
}

/** Parse the first response in `text` (head and whatever follows it). Throws when there is no head. */
export function parseResponse (text: string): RawResponse {
  const end = text.indexOf('\r\n\r\n')
  if (end === -1) throw new Error(`no complete response head in ${JSON.stringify(text.slice(0, 200))}`)
  const lines = text.slice(0, end).split('\r\n')
  const m = /^HTTP\/1\.[01] (\d{3})/.exec(lines[0] ?? '')
  if (m === null) throw new Error(`not a status line: ${JSON.stringify(lines[0])}`)
  const headers: Record<string, string> = {}
  for (const line of lines.slice(1)) {
    const colon = line.indexOf(':')
    const name = line.slice(0, colon).trim().toLowerCase()
    const value = line.slice(colon + 1).trim()
    headers[name] = headers[name] === undefined ? value : `${headers[name]}, ${value}`
  }
  return { status: Number(m[1]), headers, body: text.slice(end + 4) }
}

/** A client socket that records everything it receives and whether it closed. */
export class WireClient {
  readonly socket: net.Socket
  received = ''
  closed = false
  error: Error | null = null
  private waiters: Array<() => void> = []

  private constructor (socket: net.Socket) {
    this.socket = socket
    socket.on('data', (c: Buffer) => { this.received += c.toString('latin1'); this.wake() })
    socket.on('error', (err) => { this.error = err; this.wake() })
    socket.on('close', () => { this.closed = true; this.wake() })
  }

  static async connect (port: number): Promise<WireClient> {
    const socket = net.connect(port, '127.0.0.1')
    socket.setNoDelay(true)
    await once(socket, 'connect')
    return new WireClient(socket)
  }

  write (data: string | Buffer): void {
    this.socket.write(data)
  }

  private wake (): void {
    const waiters = this.waiters
    this.waiters = []
    for (const w of waiters) w()
  }

  /** Wait until `check` holds (re-checked on every event), or fail after `timeoutMs`. */
  async until (check: (c: WireClient) => boolean, timeoutMs = 5000, what = 'condition'): Promise<void> {
    const deadline = Date.now() + timeoutMs
    while (!check(this)) {
      const left = deadline - Date.now()
      if (left <= 0) throw new Error(`timed out waiting for ${what}; received ${JSON.stringify(this.received.slice(0, 300))}, closed=${String(this.closed)}`)
      await new Promise<void>((resolve) => {
        const timer = setTimeout(resolve, Math.min(left, 50))
        this.waiters.push(() => { clearTimeout(timer); resolve() })
      })
    }
  }

  /** Wait for one complete response head plus a body of `content-length` bytes (or the close). */
  async response (timeoutMs = 5000): Promise<RawResponse> {
    await this.until((c) => {
      const end = c.received.indexOf('\r\n\r\n')
      if (end === -1) return c.closed
      const length = /\r\ncontent-length:\s*(\d+)/i.exec(c.received.slice(0, end))
      return length === null ? c.closed : c.received.length >= end + 4 + Number(length[1])
    }, timeoutMs, 'a response')
    return parseResponse(this.received)
  }

  destroy (): void {
    this.socket.destroy()
  }
}
