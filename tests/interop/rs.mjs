// An independent DPoP resource server for the interoperability tests, built on `jose` (npm) only.
//
// Every request except the /_interop/ hooks must carry `Authorization: DPoP <JWT access token>`
// and a `DPoP` proof. It checks the access token (RFC 9068 JWT signed by the authorization
// server's JWKS, `iss`, `aud`, `exp`) and the proof as RFC 9449 §4.3 and §7.1 ask: one compact JWS
// with typ dpop+jwt, alg ES256, a public `jwk` header that verifies the signature, `jti` not seen
// before, `htm` equal to the method, `htu` equal to the request URL without query and fragment,
// `iat` within -300 s / +60 s, `ath` = base64url(SHA-256(token)), and the token's `cnf.jkt` equal
// to the RFC 7638 thumbprint of the proof key. A good request is echoed as JSON
// {ok, method, path, query, jkt, sub, client_id, scope, body_length, body_sha256}.
//
// Configuration (environment; `--port`, `--issuer`, `--audience`, `--require-nonce` override it):
//   RS_PORT            port (0, the default, picks a free one)
//   RS_ISSUER          the authorization server's issuer (its JWKS is fetched from ISSUER/jwks)
//   RS_JWKS_URI        JWKS URL when it is not ISSUER/jwks
//   RS_AUDIENCE        expected `aud` (default http://127.0.0.1:PORT/)
//   RS_REQUIRE_NONCE   off | required: demand this server's DPoP nonce (RFC 9449 §9)
//   RS_SEEN_FILE       append every verified proof as one JSON line to this file
//
// Test hooks:
//   GET  /_interop/seen?since=N   every request received: method, url, proof, access_token,
//                                 nonce (the proof's, once verified), required_nonce (the one
//                                 this server wanted), dpop_nonce (the one it answered with),
//                                 status, error
//   GET  /_interop/config         current switches
//   POST /_interop/config         {"require_nonce": bool, "rotate_nonce": bool, "invalid_token": N}
//                                 rotate_nonce: a fresh nonce after every request, so a held
//                                 nonce is always stale; invalid_token: answer the next N API
//                                 requests 401 invalid_token (-1: all of them)
// INTEROP_EXIT_ON_STDIN_EOF=1: also exit when stdin reaches end of file (the parent died).
// Prints one JSON line {"ready": true, "url", "port", "audience"} on stdout; exits on SIGTERM/SIGINT.

import { createHash, randomBytes } from 'node:crypto';
import { appendFileSync } from 'node:fs';
import * as http from 'node:http';
import { parseArgs } from 'node:util';

import {
  calculateJwkThumbprint,
  createRemoteJWKSet,
  EmbeddedJWK,
  jwtVerify,
} from 'jose';
import { stopOnSignals } from './lifecycle.mjs';

const { values: args } = parseArgs({
  options: {
    port: { type: 'string' },
    issuer: { type: 'string' },
    audience: { type: 'string' },
    'require-nonce': { type: 'string' },
  },
});

function fail(message) {
  process.stderr.write(`rs.mjs: ${message}\n`);
  process.exit(2);
}

const issuer = args.issuer ?? process.env.RS_ISSUER;
if (!issuer) fail('the authorization server issuer is required (RS_ISSUER or --issuer)');
const port = Number(args.port ?? process.env.RS_PORT ?? 0);
if (!Number.isInteger(port) || port < 0 || port > 65535) fail('bad port');
const nonceMode = args['require-nonce'] ?? process.env.RS_REQUIRE_NONCE ?? 'off';
if (!['off', 'required'].includes(nonceMode)) fail(`require-nonce must be "off" or "required", not ${nonceMode}`);
const seenFile = process.env.RS_SEEN_FILE;

const MAX_AGE = 300;
const MAX_FUTURE = 60;

const state = {
  requireNonce: nonceMode === 'required',
  rotateNonce: false,
  invalidToken: 0,
  nonce: randomBytes(16).toString('base64url'),
};
const seen = [];
const jtis = new Map(); // jti -> iat, pruned once the proof is too old to pass the iat check

const jwks = createRemoteJWKSet(new URL(process.env.RS_JWKS_URI ?? `${issuer.replace(/\/$/, '')}/jwks`));
const b64sha256 = (value) => createHash('sha256').update(value).digest('base64url');

class Reject extends Error {
  constructor(error, description, headers = {}) {
    super(description);
    this.error = error;
    this.headers = headers;
  }
}

function challenge(error, description) {
  return `DPoP algs="ES256", error="${error}", error_description="${description}"`;
}

function readBody(req) {
  return new Promise((resolve, reject) => {
    const chunks = [];
    req.on('data', (c) => chunks.push(c));
    req.on('end', () => resolve(Buffer.concat(chunks)));
    req.on('error', reject);
  });
}

function sendJson(res, status, body, headers = {}) {
  res.writeHead(status, { 'content-type': 'application/json', 'cache-control': 'no-store', ...headers });
  res.end(JSON.stringify(body));
}

async function verify(req, audience, url) {
  const authorization = req.headers.authorization ?? '';
  const match = /^DPoP ([A-Za-z0-9\-._~+/]+=*)$/i.exec(authorization);
  if (!match) throw new Reject('invalid_token', 'Authorization must be DPoP <token>');
  const token = match[1];
  const proof = req.headers.dpop;
  if (typeof proof !== 'string' || proof.includes(',')) throw new Reject('invalid_dpop_proof', 'exactly one DPoP header is required');

  let access;
  try {
    access = await jwtVerify(token, jwks, { issuer, audience, typ: 'at+jwt' });
  } catch (err) {
    throw new Reject('invalid_token', `access token rejected: ${err.code ?? err.message}`);
  }
  const jkt = access.payload.cnf?.jkt;
  if (typeof jkt !== 'string') throw new Reject('invalid_token', 'access token is not DPoP-bound (no cnf.jkt)');

  let checked;
  try {
    checked = await jwtVerify(proof, EmbeddedJWK, { typ: 'dpop+jwt', algorithms: ['ES256'] });
  } catch (err) {
    throw new Reject('invalid_dpop_proof', `proof rejected: ${err.code ?? err.message}`);
  }
  const { payload, protectedHeader } = checked;
  if ('d' in protectedHeader.jwk) throw new Reject('invalid_dpop_proof', 'jwk carries a private key');
  for (const claim of ['jti', 'htm', 'htu']) {
    if (typeof payload[claim] !== 'string' || !payload[claim]) throw new Reject('invalid_dpop_proof', `${claim} missing`);
  }
  if (!Number.isInteger(payload.iat)) throw new Reject('invalid_dpop_proof', 'iat missing');
  if (payload.htm !== req.method) throw new Reject('invalid_dpop_proof', 'htm mismatch');
  const htu = URL.parse(payload.htu);
  if (!htu) throw new Reject('invalid_dpop_proof', 'htu is not a URL');
  htu.search = '';
  htu.hash = '';
  const expected = new URL(url.href);
  expected.search = '';
  expected.hash = '';
  if (htu.href !== expected.href) throw new Reject('invalid_dpop_proof', 'htu mismatch');
  const now = Math.floor(Date.now() / 1000);
  if (payload.iat < now - MAX_AGE || payload.iat > now + MAX_FUTURE) throw new Reject('invalid_dpop_proof', 'iat outside the window');
  if (payload.ath !== b64sha256(token)) throw new Reject('invalid_dpop_proof', 'ath mismatch');
  if ((await calculateJwkThumbprint(protectedHeader.jwk)) !== jkt) throw new Reject('invalid_token', 'proof key does not match cnf.jkt');

  if (state.requireNonce && payload.nonce !== state.nonce) {
    throw new Reject('use_dpop_nonce', 'a DPoP nonce is required', { 'DPoP-Nonce': state.nonce });
  }
  for (const [oldJti, iat] of jtis) if (iat < now - MAX_AGE - MAX_FUTURE) jtis.delete(oldJti);
  if (jtis.has(payload.jti)) throw new Reject('invalid_dpop_proof', 'jti replayed');
  jtis.set(payload.jti, payload.iat);
  return { token, proof, payload, access: access.payload, jkt };
}

async function control(req, res, url) {
  if (url.pathname === '/_interop/seen' && req.method === 'GET') {
    const since = Number(url.searchParams.get('since') ?? 0);
    return sendJson(res, 200, { count: seen.length, seen: seen.slice(since) });
  }
  if (url.pathname === '/_interop/config') {
    if (req.method === 'POST') {
      let update;
      try {
        update = JSON.parse((await readBody(req)).toString('utf8'));
      } catch {
        return sendJson(res, 400, { error: 'body must be JSON' });
      }
      for (const key of ['require_nonce', 'rotate_nonce']) {
        if (key in update && typeof update[key] !== 'boolean') return sendJson(res, 400, { error: `${key} must be a boolean` });
      }
      if ('invalid_token' in update && !Number.isInteger(update.invalid_token)) return sendJson(res, 400, { error: 'invalid_token must be an integer' });
      if ('require_nonce' in update) state.requireNonce = update.require_nonce;
      if ('rotate_nonce' in update) state.rotateNonce = update.rotate_nonce;
      if ('invalid_token' in update) state.invalidToken = update.invalid_token;
    }
    return sendJson(res, 200, {
      require_nonce: state.requireNonce, rotate_nonce: state.rotateNonce, invalid_token: state.invalidToken,
    });
  }
  return sendJson(res, 404, { error: 'unknown test hook' });
}

async function handle(req, res, base) {
  // htu is checked against the URL as the client addressed it (its Host header), RFC 9449 §4.3.
  const url = new URL(req.url, req.headers.host ? `http://${req.headers.host}` : base);
  if (url.pathname.startsWith('/_interop/')) return control(req, res, url);

  const body = await readBody(req);
  const entry = {
    seq: seen.length,
    method: req.method,
    url: url.href,
    proof: req.headers.dpop ?? null,
    access_token: (req.headers.authorization ?? '').replace(/^DPoP /i, '') || null,
    nonce: null,
    required_nonce: state.requireNonce ? state.nonce : null,
    dpop_nonce: null,
    status: null,
    error: null,
    time: Date.now() / 1000,
  };
  seen.push(entry);
  const nonceHeaders = state.requireNonce ? { 'DPoP-Nonce': state.nonce } : {};
  try {
    const result = await verify(req, audience, url);
    entry.nonce = result.payload.nonce ?? null;
    if (state.invalidToken !== 0) {
      if (state.invalidToken > 0) state.invalidToken -= 1;
      throw new Reject('invalid_token', 'the access token was revoked (test switch)');
    }
    entry.status = 200;
    entry.dpop_nonce = nonceHeaders['DPoP-Nonce'] ?? null;
    if (seenFile) appendFileSync(seenFile, `${JSON.stringify(entry)}\n`);
    return sendJson(res, 200, {
      ok: true,
      method: req.method,
      path: url.pathname,
      query: url.search,
      jkt: result.jkt,
      sub: result.access.sub,
      client_id: result.access.client_id,
      scope: result.access.scope ?? null,
      body_length: body.length,
      body_sha256: b64sha256(body),
    }, nonceHeaders);
  } catch (err) {
    if (!(err instanceof Reject)) throw err;
    const headers = { 'WWW-Authenticate': challenge(err.error, err.message), ...nonceHeaders, ...err.headers };
    entry.status = 401;
    entry.error = err.error;
    entry.dpop_nonce = headers['DPoP-Nonce'] ?? null;
    return sendJson(res, 401, { error: err.error, error_description: err.message }, headers);
  } finally {
    // rotate_nonce: whatever nonce the client holds is stale by its next request.
    if (state.rotateNonce) state.nonce = randomBytes(16).toString('base64url');
  }
}

let audience = args.audience ?? process.env.RS_AUDIENCE;
const server = http.createServer();
server.listen(port, '127.0.0.1', () => {
  const actualPort = server.address().port;
  const base = `http://127.0.0.1:${actualPort}`;
  audience ??= `${base}/`;
  server.on('request', (req, res) => {
    handle(req, res, base).catch((err) => {
      process.stderr.write(`rs.mjs: ${err.stack ?? err}\n`);
      if (!res.headersSent) sendJson(res, 500, { error: 'server_error' });
      else res.destroy();
    });
  });
  process.stdout.write(`${JSON.stringify({ ready: true, url: `${base}/`, port: actualPort, audience })}\n`);
});
server.on('error', (err) => fail(err.message));

stopOnSignals(server);
