// Talking to the child processes of a bench: the parent calls, the child serves.

/** A child that answers messages with `{ id, … }` replies. */
export function rpc (child) {
  let next = 0
  const waiting = new Map()
  child.on('message', (m) => {
    const resolve = waiting.get(m.id)
    if (resolve !== undefined) { waiting.delete(m.id); resolve(m) }
  })
  return (m) => new Promise((resolve) => { const id = ++next; waiting.set(id, resolve); child.send({ ...m, id }) })
}

export function serve (handle) {
  process.on('message', async (m) => { process.send({ id: m.id, ...(await handle(m)) }) })
  process.on('disconnect', () => { process.exit(0) })
}
