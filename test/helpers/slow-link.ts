/**
 * A slow network link to a server (a far zone, a saturated NIC): a TCP relay on a loopback port
 * that passes what the client sends at once and what the server answers at `bytesPerSecond`, on
 * each connection. Closed in teardown.
 */
import type { Test } from 'tap'
import { createConnection, createServer, type Socket } from 'node:net'

export interface SlowLink {
  /** `http://127.0.0.1:PORT`: the server, through the link. */
  url: string
}

export async function startSlowLink (t: Test, target: string, bytesPerSecond: number): Promise<SlowLink> {
  const { hostname, port } = new URL(target)
  const sockets = new Set<Socket>()
  const server = createServer((client) => {
    const upstream = createConnection({ host: hostname, port: Number(port) })
    for (const s of [client, upstream]) {
      sockets.add(s)
      s.on('error', () => { client.destroy(); upstream.destroy() })
      s.on('close', () => { sockets.delete(s); client.destroy(); upstream.destroy() })
    }
    client.pipe(upstream)
    // The way back is paced: each chunk holds the next one for as long as the link takes to carry it.
    upstream.on('data', (chunk: Buffer) => {
      upstream.pause()
      client.write(chunk)
      setTimeout(() => { upstream.resume() }, Math.ceil(chunk.length * 1000 / bytesPerSecond))
    })
    upstream.on('end', () => { client.end() })
  })
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve))
  t.teardown(async () => {
    for (const s of sockets) s.destroy()
    await new Promise<void>((resolve) => server.close(() => { resolve() }))
  })
  const address = server.address() as { port: number }
  return { url: `http://127.0.0.1:${address.port}` }
}
