/**
 * Clients for tests. `send` keeps the path exactly as given (no URL normalisation), so path
 * normalisation can be tested; `raw` writes bytes on a socket and returns what came back.
 */
import net from 'node:net'
import { Client, type Dispatcher } from 'undici'

export interface Reply {
  status: number
  headers: Record<string, string | string[] | undefined>
  body: string
  json: <T = Record<string, unknown>>() => T
}

export async function send (base: string, path: string, options: Partial<Dispatcher.RequestOptions> = {}): Promise<Reply> {
  const client = new Client(base)
  try {
    const res = await client.request({ path, method: 'GET', ...options } as Dispatcher.RequestOptions)
    const body = await res.body.text()
    return { status: res.statusCode, headers: res.headers, body, json: <T>() => JSON.parse(body) as T }
  } finally {
    await client.close()
  }
}

/** Write `request` on a fresh connection and collect everything until the server closes it (or `waitMs`). */
export async function raw (port: number, request: string | Buffer, waitMs = 2000): Promise<string> {
  return await new Promise((resolve, reject) => {
    const socket = net.connect(port, '127.0.0.1')
    let data = ''
    const timer = setTimeout(() => { socket.destroy(); resolve(data) }, waitMs)
    socket.on('data', (c) => { data += c.toString('latin1') })
    socket.on('close', () => { clearTimeout(timer); resolve(data) })
    socket.on('error', (err) => { clearTimeout(timer); if (data === '') reject(err); else resolve(data) })
    socket.write(request)
  })
}

export async function getJson (url: string): Promise<{ status: number, body: any }> {
  const res = await fetch(url)
  const text = await res.text()
  let body: unknown = text
  try { body = JSON.parse(text) } catch {}
  return { status: res.status, body }
}

export function sleep (ms: number): Promise<void> {
  return new Promise((resolve) => setTimeout(resolve, ms))
}

/**
 * Poll until `check` returns true or `timeoutMs` passes. The deadline only bounds a run that is
 * failing anyway (a passing check returns at once), so the default leaves room for a machine
 * several times slower than an idle one.
 */
export async function eventually (check: () => boolean | Promise<boolean>, timeoutMs = 15_000, everyMs = 20): Promise<boolean> {
  const deadline = Date.now() + timeoutMs
  while (Date.now() < deadline) {
    if (await check()) return true
    await sleep(everyMs)
  }
  return await check()
}
