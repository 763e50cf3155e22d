import numpy as np

from blockops.hessian import hessian
from blockops.inverse import inverse_hessian
from blockops.network import Dense, MSELoss, Pipeline

rng = np.random.default_rng(0)
X, y = rng.standard_normal((32, 3)), rng.standard_normal((32, 2))
net = Pipeline([Dense(3, 16, "tanh"), Dense(16, 16, "tanh"), Dense(16, 2, "identity"), MSELoss()])
pt = net.linearize(net.init(seed=0), X, y)  # forward + backward pass at (x, X, y)
H = hessian(pt, damping=1e-3)  # H + λI as a LinearOperator (fused HVP)
Hinv = inverse_hessian(pt, damping=1e-3)  # exact (H + λI)⁻¹, factored once, linear in depth
step = Hinv @ pt.gradient  # a damped Newton step
residual = np.linalg.norm(H @ step - pt.gradient) / np.linalg.norm(pt.gradient)
print(f"loss {pt.loss:.4f}, {net.n_params} parameters, relative residual {residual:.1e}")
