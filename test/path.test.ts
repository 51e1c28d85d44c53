import t from 'tap'
import { absoluteForm, normalisePath, matchKey } from '../src/proxy/path.js'
import { startUpstream } from './helpers/upstream.js'
import { startTestSidecar } from './helpers/sidecar.js'
import { send, raw } from './helpers/http.js'
import { parseResponse, type RawResponse } from './helpers/wire.js'

t.test('normalisePath', async (t) => {
  t.test('leaves a normal path alone', async (t) => {
    t.equal(normalisePath('/'), '/')
    t.equal(normalisePath('/a/b/c'), '/a/b/c')
    t.equal(normalisePath('/a/b/'), '/a/b/', 'a trailing slash is kept')
    t.equal(normalisePath('/a/.hidden/b..c/...'), '/a/.hidden/b..c/...', 'dots inside segment names are not dot segments')
  })

  t.test('decodes percent-encoded unreserved characters (RFC 3986 §2.3)', async (t) => {
    t.equal(normalisePath('/%41'), '/A')
    t.equal(normalisePath('/%61dmin'), '/admin')
    t.equal(normalisePath('/checkou%74'), '/checkout')
    t.equal(normalisePath('/%7e%7E%2d%5F%2E%30'), '/~~-_.0', 'tilde, hyphen, underscore, dot, digit')
  })

  t.test('keeps other escapes encoded, hex upper-cased', async (t) => {
    t.equal(normalisePath('/a%2fb'), '/a%2Fb', '%2F is data, not a separator')
    t.equal(normalisePath('/a%2Fb'), '/a%2Fb')
    t.equal(normalisePath('/a%2F%2Fb'), '/a%2F%2Fb', 'encoded slashes are not collapsed')
    t.equal(normalisePath('/a%2F..%2Fb'), '/a%2F..%2Fb', 'encoded slashes do not make dot segments')
    t.equal(normalisePath('/x%3ay%20z'), '/x%3Ay%20z', 'reserved and other bytes stay escaped')
    t.equal(normalisePath('/caf%c3%a9'), '/caf%C3%A9')
    t.equal(normalisePath('/q%3fnot-a-query'), '/q%3Fnot-a-query', 'an encoded ? does not start a query')
  })

  t.test('collapses runs of slashes', async (t) => {
    t.equal(normalisePath('//admin'), '/admin')
    t.equal(normalisePath('/a//b///c'), '/a/b/c')
    t.equal(normalisePath('/a/b//'), '/a/b/')
  })

  t.test('resolves dot segments (RFC 3986 §5.2.4)', async (t) => {
    t.equal(normalisePath('/a/./b'), '/a/b')
    t.equal(normalisePath('/a/../b'), '/b')
    t.equal(normalisePath('/x/../admin'), '/admin')
    t.equal(normalisePath('/a/b/..'), '/a/', '.. at the end leaves a directory')
    t.equal(normalisePath('/a/b/.'), '/a/b/', '. at the end leaves a directory')
    t.equal(normalisePath('/a/b/../'), '/a/')
    t.equal(normalisePath('/..'), '/', 'past the root stays at the root')
    t.equal(normalisePath('/../a'), '/a')
    t.equal(normalisePath('/a/../../../b'), '/b')
    t.equal(normalisePath('/.'), '/')
    t.equal(normalisePath('/./'), '/')
    t.equal(normalisePath('/a/%2e%2e/b'), '/b', 'encoded dots are dot segments once decoded')
    t.equal(normalisePath('/a/.%2E/b'), '/b')
    t.equal(normalisePath('//a//..//b'), '/b', 'slashes collapse before dot segments resolve')
  })

  t.test('leaves the query untouched', async (t) => {
    t.equal(normalisePath('/a?x=%41&y=//z/../w'), '/a?x=%41&y=//z/../w')
    t.equal(normalisePath('/a/../b?x=%41&y=//z/../w'), '/b?x=%41&y=//z/../w')
    t.equal(normalisePath('/%61?q=%zz'), '/a?q=%zz', 'a bad escape in the query is not the path\'s problem')
    t.equal(normalisePath('/a?'), '/a?')
  })

  t.test('invalid percent-encoding is refused', async (t) => {
    t.equal(normalisePath('/%zz'), null)
    t.equal(normalisePath('/%4'), null)
    t.equal(normalisePath('/a%'), null)
    t.equal(normalisePath('/a%g1/b'), null)
    t.equal(normalisePath('/ok/%41%4'), null, 'one bad escape among good ones')
    t.equal(normalisePath('/%4?x=1'), null, 'a truncated escape just before the query')
  })

  t.test('a fragment or a backslash is refused, not normalised (RFC 9112 §3.2, RFC 3986 §3.3, §3.5)', async (t) => {
    t.equal(normalisePath('/pay#x'), null, 'a fragment is never part of a request-target')
    t.equal(normalisePath('/pay?q=1#x'), null, '… in the query either')
    t.equal(normalisePath('/#'), null)
    t.equal(normalisePath('/x\\..\\checkout'), null, 'WHATWG URL parsers read \\ as /')
    t.equal(normalisePath('/checkout\\'), null)
    t.equal(normalisePath('/a?x=\\'), '/a?x=\\', 'a backslash in the query does not change the path')
    t.equal(normalisePath('/pay%23x'), '/pay%23x', 'an encoded # is data')
  })

  t.test('targets that are not origin-form are refused', async (t) => {
    t.equal(normalisePath('*'), null, 'asterisk-form')
    t.equal(normalisePath('http://example.com/a'), null, 'absolute-form (taken apart by absoluteForm first)')
    t.equal(normalisePath('example.com:443'), null, 'authority-form')
    t.equal(normalisePath(''), null)
    t.equal(normalisePath('a/b'), null)
  })

  t.test('absolute-form: its authority and its origin-form', async (t) => {
    t.same(absoluteForm('http://example.com/a/b?x=1'), { authority: 'example.com', target: '/a/b?x=1', defaultPort: ':80', empty: false })
    t.same(absoluteForm('HTTPS://Example.com:8443'), { authority: 'Example.com:8443', target: '/', defaultPort: ':443', empty: true }, 'no path: /, and said to be empty (OPTIONS: the server itself)')
    t.same(absoluteForm('http://example.com/'), { authority: 'example.com', target: '/', defaultPort: ':80', empty: false }, 'the path / is not empty')
    t.same(absoluteForm('http://example.com?x=1'), { authority: 'example.com', target: '/?x=1', defaultPort: ':80', empty: false }, 'a query without a path')
    t.same(absoluteForm('http://[::1]:80/a'), { authority: '[::1]:80', target: '/a', defaultPort: ':80', empty: false })
    t.equal(absoluteForm('http://user@example.com/a'), null, 'userinfo is refused')
    t.equal(absoluteForm('http:///a'), null, 'an empty authority')
    t.equal(absoluteForm('ftp://example.com/a'), null, 'another scheme')
    t.equal(absoluteForm('/a'), null, 'origin-form is not absolute-form')
  })
})

t.test('matchKey: what a non-strict route matches on (SPEC §15)', async (t) => {
  const cases: Array<[string, string, string]> = [
    ['/', '/', 'the root keeps its slash'],
    ['/checkout', '/checkout', 'a plain path is its own key'],
    ['/CHECKOUT', '/checkout', 'ASCII case is ignored'],
    ['/Checkout/Cart?Q=A', '/checkout/cart', 'the query is not part of the key'],
    ['/pay/', '/pay', 'one trailing slash is ignored'],
    ['/pay;jsessionid=1', '/pay', '; segment parameters are ignored'],
    ['/a;x/b;y=2/', '/a/b', '… in every segment'],
    ['/x/..;/checkout', '/checkout', '..; is a dot segment once its parameter is gone (servlet containers)'],
    ['/;x/checkout', '/checkout', 'an emptied segment collapses'],
    ['/caf%C3%A9/\u00c9', '/caf%c3%a9/\u00c9', 'only ASCII letters are folded']
  ]
  for (const [path, key, why] of cases) t.equal(matchKey(path), key, `${path}: ${why}`)
})

t.test('end to end: spelling cannot bypass a prefix route; the normalised path is forwarded', async (t) => {
  const admin = await startUpstream()
  t.teardown(admin.close)
  const other = await startUpstream()
  t.teardown(other.close)
  const { proxy, proxyPort } = await startTestSidecar(t, {
    upstreams: { admin: { url: admin.url }, other: { url: other.url } },
    routes: [
      { match: { pathPrefix: '/admin' }, upstream: 'admin' },
      { match: { pathPrefix: '/' }, upstream: 'other' }
    ]
  })
  const cases: Array<[string, string]> = [
    ['/admin/users', '/admin/users'],
    ['/x/../admin', '/admin'],
    ['//admin', '/admin'],
    ['/%61dmin', '/admin'],
    ['/%61dmin/%2e%2e/admin/x?q=%2e%2e', '/admin/x?q=%2e%2e'],
    ['/x/%2E%2E/admin/a%2fb', '/admin/a%2Fb'],
    ['/public/./admin/../page', '/public/page']
  ]
  for (const [sent, forwarded] of cases) {
    const before = { admin: admin.received.length, other: other.received.length }
    const res = await send(proxy, sent)
    t.equal(res.status, 200, `${sent} answered`)
    const expected = forwarded.startsWith('/admin') ? 'admin' : 'other'
    t.equal(admin.received.length - before.admin, expected === 'admin' ? 1 : 0, `${sent} → ${expected}`)
    t.equal(other.received.length - before.other, expected === 'other' ? 1 : 0)
    t.equal(res.json<{ url: string }>().url, forwarded, `${sent} forwarded as ${forwarded}`)
  }

  const bad = await send(proxy, '/admin%zz')
  t.equal(bad.status, 400)
  t.equal(bad.headers['x-breakwater-error'], 'bad_request')
  t.equal(bad.json<{ error: string }>().error, 'bad_request')

  t.equal(admin.received.length, 6, 'no refused request reached the upstream')

  // Absolute-form (RFC 9112 §3.2.2: a server must accept it), written on the wire: routed and
  // forwarded in origin-form, normalised like any target, when its authority is the Host sent.
  const absolute = async (target: string, host: string): Promise<RawResponse> => parseResponse(await raw(proxyPort, `GET ${target} HTTP/1.1\r\nHost: ${host}\r\nConnection: close\r\n\r\n`))
  for (const target of ['http://127.0.0.1/admin', 'HTTP://127.0.0.1/x/%2e%2e/admin']) {
    const res = await absolute(target, '127.0.0.1')
    t.equal(res.status, 200, `${target}: answered`)
    t.equal(admin.received.at(-1)?.url, '/admin', `${target}: to the admin route, forwarded as /admin`)
  }
  t.equal(admin.received.length, 8)
  const elsewhere = await absolute('http://other.example/admin', '127.0.0.1')
  t.equal(elsewhere.status, 400, 'an authority that is not the Host: refused')
  t.equal(elsewhere.headers['x-breakwater-error'], 'bad_request')
  t.match(JSON.parse(elsewhere.body).message, /authority \(other\.example\) is not the Host header \(127\.0\.0\.1\)/)
  t.equal(admin.received.length, 8, 'and it reached no upstream')

  // One origin however it is written (RFC 9110 §4.2.3): the scheme's default port or not, any case.
  for (const [target, host] of [['http://127.0.0.1:80/admin', '127.0.0.1'], ['http://127.0.0.1/admin', '127.0.0.1:80'], ['https://127.0.0.1:443/admin', '127.0.0.1'], ['http://LOCALHOST./admin', 'localhost']]) {
    const res = await absolute(target as string, host as string)
    t.equal(res.status, 200, `${target} with Host ${host}: the same origin`)
  }
  t.equal(admin.received.length, 12)
  for (const [target, host] of [['http://127.0.0.1:443/admin', '127.0.0.1'], ['https://127.0.0.1:80/admin', '127.0.0.1'], ['http://127.0.0.1:8080/admin', '127.0.0.1']]) {
    t.equal((await absolute(target as string, host as string)).status, 400, `${target} with Host ${host}: another port, refused`)
  }
  t.equal(admin.received.length, 12)
})
