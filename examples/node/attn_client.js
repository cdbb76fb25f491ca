#!/usr/bin/env node
// A minimal attnserve client: self-attention on a random query, checked and timed.
//
//   cd examples/node && npm ci && node attn_client.js --target 127.0.0.1:50051 --layer small
//
// Loads ../../proto/attnserve/v1/attention.proto at run time with @grpc/proto-loader (no generated code).
// Exits 0 when every answer has the expected shape and only finite values, 1 otherwise.
'use strict';

const path = require('node:path');
const { parseArgs } = require('node:util');
const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');

const { values: args } = parseArgs({
  options: {
    target: { type: 'string', default: '127.0.0.1:50051' },
    layer: { type: 'string', default: 'small' },
    batch: { type: 'string', default: '2' },
    seq: { type: 'string', default: '16' },
    'stream-requests': { type: 'string', default: '4' },
    timeout: { type: 'string', default: '30' }, // seconds per call
    'proto-dir': { type: 'string', default: path.join(__dirname, '..', '..', 'proto') },
  },
});

class CheckFailed extends Error {}

function loadService(protoDir) {
  const definition = protoLoader.loadSync('attnserve/v1/attention.proto', {
    includeDirs: [protoDir],
    keepCase: true, // field names as in the .proto (raw_data, need_weights, ...)
    longs: Number, // int64 (shape, timing) as plain numbers
    enums: String, // dtype as 'FLOAT32'
    defaults: true, // unset fields present with their default values
    oneofs: true,
  });
  return grpc.loadPackageDefinition(definition).attnserve.v1;
}

// Float32Array -> attnserve.v1.Tensor with little-endian float32 raw_data.
function toTensor(values, shape) {
  const bytes = Buffer.alloc(values.length * 4);
  values.forEach((v, i) => bytes.writeFloatLE(v, i * 4));
  return { shape, dtype: 'FLOAT32', raw_data: bytes };
}

// attnserve.v1.Tensor (FLOAT32 in raw_data, as the server answers) -> Float32Array.
function fromTensor(tensor) {
  if (tensor.dtype !== 'FLOAT32') throw new CheckFailed(`expected a FLOAT32 tensor, got dtype ${tensor.dtype}`);
  const bytes = tensor.raw_data;
  const values = new Float32Array(bytes.length / 4);
  for (let i = 0; i < values.length; i++) values[i] = bytes.readFloatLE(i * 4);
  return values;
}

function check(name, tensor, expectedShape) {
  const shape = tensor.shape.map(Number);
  if (shape.join(',') !== expectedShape.join(',')) {
    throw new CheckFailed(`${name}: shape [${shape}], expected [${expectedShape}]`);
  }
  const values = fromTensor(tensor);
  const expectedCount = expectedShape.reduce((a, b) => a * b, 1);
  if (values.length !== expectedCount) {
    throw new CheckFailed(`${name}: ${values.length} values, expected ${expectedCount}`);
  }
  const nonFinite = values.filter((v) => !Number.isFinite(v)).length;
  if (nonFinite > 0) throw new CheckFailed(`${name}: ${nonFinite} non-finite values`);
  return values;
}

function randomNormal(n) {
  const values = new Float32Array(n);
  for (let i = 0; i < n; i++) {
    // Box-Muller
    values[i] = Math.sqrt(-2 * Math.log(1 - Math.random())) * Math.cos(2 * Math.PI * Math.random());
  }
  return values;
}

function deadline() {
  return new Date(Date.now() + Number(args.timeout) * 1000);
}

// The bearer token of servers started with --auth-token-file, from $ATTNSERVE_TOKEN (none when unset).
function authMetadata() {
  const md = new grpc.Metadata();
  if (process.env.ATTNSERVE_TOKEN) md.set('authorization', `Bearer ${process.env.ATTNSERVE_TOKEN}`);
  return md;
}

// Promise wrapper of a unary call.
function unary(client, method, request) {
  return new Promise((resolve, reject) => {
    client[method](request, authMetadata(), { deadline: deadline() },
      (err, response) => (err ? reject(err) : resolve(response)));
  });
}

function describe(response, ms) {
  const t = response.timing;
  return `round trip ${ms.toFixed(2)} ms (server: queue ${t.queue_us} us, compute ${t.compute_us} us, ` +
    `batch of ${t.batch_size})`;
}

async function run(client) {
  await new Promise((resolve, reject) => client.waitForReady(deadline(), (err) => (err ? reject(err) : resolve())));

  const layer = await unary(client, 'GetLayer', { name: args.layer });
  const E = layer.config.embed_dim;
  const B = Number(args.batch);
  const L = Number(args.seq);
  console.log(`layer ${args.layer}: embed_dim=${E} num_heads=${layer.config.num_heads} ready=${layer.ready}`);
  const query = toTensor(randomNormal(B * L * E), [B, L, E]);

  // 1. Self-attention (key and value unset), query sent as raw_data.
  let start = performance.now();
  let response = await unary(client, 'Infer', { layer: args.layer, query });
  let ms = performance.now() - start;
  check('output', response.output, [B, L, E]);
  console.log(`Infer: output shape [${response.output.shape}], finite; ${describe(response, ms)}`);

  // 2. The same with need_weights: attention weights averaged over heads, [B, L, S] with S = L here.
  start = performance.now();
  response = await unary(client, 'Infer', { layer: args.layer, query, need_weights: true });
  ms = performance.now() - start;
  check('output (need_weights)', response.output, [B, L, E]);
  const weights = check('attn_weights', response.attn_weights, [B, L, L]);
  for (let row = 0; row < B * L; row++) {
    const sum = weights.subarray(row * L, (row + 1) * L).reduce((a, b) => a + b, 0);
    if (Math.abs(sum - 1) > 1e-4) throw new CheckFailed(`attn_weights: row ${row} sums to ${sum}`);
  }
  console.log(`Infer need_weights: output shape [${response.output.shape}], attn_weights shape ` +
    `[${response.attn_weights.shape}], finite; ${describe(response, ms)}`);

  // 3. InferStream: several requests of different lengths on one stream; answers may come back in any
  //    order, so they are matched by id.
  const requests = new Map();
  for (let i = 0; i < Number(args['stream-requests']); i++) {
    const shape = [1, L + i, E];
    requests.set(`req-${i}`, { id: `req-${i}`, layer: args.layer, query: toTensor(randomNormal(shape[0] * shape[1] * E), shape) });
  }
  start = performance.now();
  const responses = await new Promise((resolve, reject) => {
    const received = [];
    const call = client.InferStream(authMetadata(), { deadline: deadline() });
    call.on('data', (r) => received.push(r));
    call.on('error', reject);
    call.on('end', () => resolve(received));
    for (const request of requests.values()) call.write(request);
    call.end();
  });
  ms = performance.now() - start;
  const answered = new Set();
  for (const r of responses) {
    if (!requests.has(r.id) || answered.has(r.id)) throw new CheckFailed(`InferStream: unexpected response id '${r.id}'`);
    if (r.error) throw new CheckFailed(`InferStream ${r.id}: error ${r.error.code}: ${r.error.message}`);
    check(`InferStream ${r.id} output`, r.output, requests.get(r.id).query.shape);
    answered.add(r.id);
  }
  const missing = [...requests.keys()].filter((id) => !answered.has(id));
  if (missing.length) throw new CheckFailed(`InferStream: no response for ${missing.join(', ')}`);
  console.log(`InferStream: ${answered.size} responses matched by id (${responses.map((r) => r.id).join(', ')}), ` +
    `shapes and values checked; ${ms.toFixed(2)} ms`);
}

async function main() {
  const { AttentionService } = loadService(args['proto-dir']);
  const client = new AttentionService(args.target, grpc.credentials.createInsecure());
  try {
    await run(client);
    console.log('OK');
    return 0;
  } catch (err) {
    if (err instanceof CheckFailed) {
      console.error(`FAIL: ${err.message}`);
    } else if (err.code !== undefined) {
      console.error(`FAIL: RPC error ${grpc.status[err.code] ?? err.code}: ${err.details ?? err.message}`);
    } else {
      console.error(`FAIL: ${err.message ?? err}`);
    }
    return 1;
  } finally {
    client.close();
  }
}

main().then((code) => {
  process.exitCode = code;
});
