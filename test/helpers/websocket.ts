/**
 * A real WebSocket-handshaking upstream for tunnel tests: a `node:http` server whose
 * 'upgrade' handler answers 101 with the RFC 6455 accept key and then echoes every byte
 * (no framing: the proxy tunnels bytes, it does not speak WebSocket). It can push bytes
 * first, or refuse the upgrade with an ordinary response.
 */
import http from 'node:http'
import { createHash } from 'node:crypto'
import type { AddressInfo, Socket } from 'node:net'
import type { Duplex } from 'node:stream'

export interface WebSocketUpstream {
  url: string
  port: number
  /** Handshake requests as the upstream saw them. */
  handshakes: http.IncomingMessage[]
  /** Upgraded sockets, upstream side. */
  sockets: Duplex[]
  /** Bytes received on upgraded sockets, all concatenated. */
  received: () => string
  /** Plain (non-upgrade) requests seen. */
  plainRequests: number
  close: () => Promise<void>
}

export interface WebSocketUpstreamOptions {
  /** Written by the upstream right after its 101, before the client sends anything. */
  push?: string
  /** Refuse the upgrade with this status instead of 101. */
  refuse?: number
  /** Header lines the refusal carries besides its own. */
  refuseHeaders?: string[]
  /** The refusal announces its body's length but sends none (a 204 or 304 ends at its head). */
  bodiless?: boolean
  /** Written before the answer, as it is (an interim `103 Early Hints`). */
  interim?: string
}

/** RFC 6455 §4.2.2: the Sec-WebSocket-Accept value for a key. */
export function acceptKey (key: string): string {
  return createHash('sha1').update(key + '258EAFA5-E914-47DA-95CA-C5AB0DC85B11').digest('base64')
}

export async function startWebSocketUpstream (options: WebSocketUpstreamOptions = {}): Promise<WebSocketUpstream> {
  const handshakes: http.IncomingMessage[] = []
  const sockets: Duplex[] = []
  const connections = new Set<Socket>()
  let received = ''
  const state = { plainRequests: 0 }
  const server = http.createServer((_req, res) => {
    state.plainRequests++
    res.writeHead(426, { 'content-type': 'text/plain' })
    res.end('upgrade required')
  })
  server.on('connection', (s: Socket) => { connections.add(s); s.on('close', () => connections.delete(s)) })
  server.on('upgrade', (req: http.IncomingMessage, socket: Duplex, head: Buffer) => {
    handshakes.push(req)
    socket.on('error', () => socket.destroy())
    if (options.interim !== undefined) socket.write(options.interim)
    if (options.refuse !== undefined) {
      const body = 'upgrade refused'
      const extra = (options.refuseHeaders ?? []).map((line) => `${line}\r\n`).join('')
      socket.end(`HTTP/1.1 ${options.refuse} ${http.STATUS_CODES[options.refuse] ?? 'Refused'}\r\n` +
        `content-type: text/plain\r\nx-refused-by: upstream\r\n${extra}content-length: ${body.length}\r\nconnection: close\r\n\r\n${options.bodiless === true ? '' : body}`)
      return
    }
    const key = String(req.headers['sec-websocket-key'] ?? '')
    socket.write('HTTP/1.1 101 Switching Protocols\r\n' +
      'Upgrade: websocket\r\nConnection: Upgrade\r\n' +
      `Sec-WebSocket-Accept: ${acceptKey(key)}\r\nx-upstream: ws\r\n\r\n`)
    sockets.push(socket)
    if (options.push !== undefined) socket.write(options.push)
    const onData = (c: Buffer): void => {
      received += c.toString('latin1')
      socket.write(c)
    }
    if (head.length > 0) onData(head)
    socket.on('data', onData)
    // As WebSocket servers do: the peer's FIN ends the connection from this side too.
    socket.on('end', () => socket.end())
  })
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve))
  const port = (server.address() as AddressInfo).port
  return {
    url: `http://127.0.0.1:${port}`,
    port,
    handshakes,
    sockets,
    received: () => received,
    get plainRequests () { return state.plainRequests },
    close: async () => {
      for (const s of connections) s.destroy()
      for (const s of sockets) s.destroy()
      await new Promise<void>((resolve) => server.close(() => resolve()))
    }
  }
}

/** The raw bytes of a client's WebSocket handshake request. */
export function handshakeRequest (path: string, key: string, extra: string[] = []): string {
  return [
    `GET ${path} HTTP/1.1`,
    'Host: ws.example',
    'Connection: Upgrade',
    'Upgrade: websocket',
    `Sec-WebSocket-Key: ${key}`,
    'Sec-WebSocket-Version: 13',
    ...extra,
    '', ''
  ].join('\r\n')
}
