/**
 * Real upstream servers on 127.0.0.1 port 0 for tests: echo, delay, hang, reset, fail.
 * Each records what it received; `close()` destroys every open connection.
 */
import http from 'node:http'
import { connect, type AddressInfo, type Socket } from 'node:net'

export interface Received {
  method: string
  url: string
  headers: http.IncomingHttpHeaders
  rawHeaders: string[]
  bytes: number
}

export interface TestUpstream {
  url: string
  port: number
  server: http.Server
  received: Received[]
  /** Requests whose connection closed before the upstream answered (client abort seen upstream). */
  aborted: number
  close: () => Promise<void>
}

export type Handler = (req: http.IncomingMessage, res: http.ServerResponse, body: Buffer) => void

/** Start an upstream; the handler gets the whole request body (up to 1 MiB kept, the rest counted). */
export async function startUpstream (handler: Handler = echo): Promise<TestUpstream> {
  const received: Received[] = []
  const sockets = new Set<Socket>()
  const state = { aborted: 0 }
  const server = http.createServer((req, res) => {
    const chunks: Buffer[] = []
    let bytes = 0
    let kept = 0
    req.on('data', (c: Buffer) => {
      bytes += c.length
      if (kept < 1024 * 1024) { chunks.push(c); kept += c.length }
    })
    res.on('close', () => { if (!res.writableFinished) state.aborted++ })
    req.on('end', () => {
      received.push({ method: req.method ?? '', url: req.url ?? '', headers: req.headers, rawHeaders: req.rawHeaders, bytes })
      handler(req, res, Buffer.concat(chunks))
    })
    req.on('error', () => {})
  })
  server.keepAliveTimeout = 10_000
  server.on('connection', (s: Socket) => { sockets.add(s); s.on('close', () => sockets.delete(s)) })
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve))
  const port = (server.address() as AddressInfo).port
  return {
    url: `http://127.0.0.1:${port}`,
    port,
    server,
    received,
    get aborted () { return state.aborted },
    close: async () => {
      for (const s of sockets) s.destroy()
      await new Promise<void>((resolve) => server.close(() => resolve()))
    }
  }
}

/** Answers 200 with JSON describing the request. */
export const echo: Handler = (req, res, body) => {
  const payload = JSON.stringify({ method: req.method, url: req.url, headers: req.headers, rawHeaders: req.rawHeaders, body: body.toString('utf8') })
  res.writeHead(200, { 'content-type': 'application/json', 'content-length': Buffer.byteLength(payload) })
  res.end(payload)
}

export const status = (code: number, body = `status ${code}`): Handler => (_req, res) => {
  res.writeHead(code, { 'content-type': 'text/plain' })
  res.end(body)
}

export const delay = (ms: number, then: Handler = echo): Handler => (req, res, body) => {
  setTimeout(() => { if (!res.destroyed) then(req, res, body) }, ms)
}

/** Never answers. */
export const hang: Handler = () => {}

/** Drops the connection without a response. */
export const reset: Handler = (req) => { req.socket.destroy() }

/** Sends headers and part of a body that promised more, then drops the connection. */
export const failMidBody: Handler = (_req, res) => {
  res.writeHead(200, { 'content-type': 'text/plain', 'content-length': '1000' })
  res.write('partial')
  setTimeout(() => res.socket?.destroy(), 20)
}

/**
 * An address where nothing listens (connect refused). Not a port 0 port just closed: the suite's
 * servers and sidecars bind port 0 from the ephemeral range by the thousand, and one of them
 * could take it (a test once got another sidecar's 401 there). This one is below the ephemeral
 * range and the ports the fleet's local etcd picks (10000 and up), and is checked refused now.
 */
export async function refusedUrl (): Promise<string> {
  for (;;) {
    const port = 1024 + Math.floor(Math.random() * (10_000 - 1024))
    const refused = await new Promise<boolean>((resolve) => {
      const socket = connect(port, '127.0.0.1')
      socket.once('connect', () => { socket.destroy(); resolve(false) })
      socket.once('error', (err: NodeJS.ErrnoException) => { resolve(err.code === 'ECONNREFUSED') })
    })
    if (refused) return `http://127.0.0.1:${port}`
  }
}
